"""Token reduction: merge or prune tokens before attention and restore them after, on U-Nets and DiTs."""
