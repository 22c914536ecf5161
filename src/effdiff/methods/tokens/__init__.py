"""Token reduction: merge or prune tokens before attention and restore them after, on U-Nets and DiTs."""

from effdiff.methods.tokens.atedm import ATEDM
from effdiff.methods.tokens.base import TokenBlock, TokenMethod
from effdiff.methods.tokens.maps import TokenMap
from effdiff.methods.tokens.tome import ToMe

__all__ = ["ATEDM", "TokenBlock", "TokenMap", "TokenMethod", "ToMe"]
