import pytest
import torch

from effdiff.methods.tokens.atedm import prune_map, weighted_pagerank
from effdiff.methods.tokens.maps import bipartite, partition

GRIDS = [(4, 4), (5, 7), (3, 3), (1, 6), (9, 2)]


@pytest.mark.parametrize(("h", "w"), GRIDS)
def test_partition_one_dst_per_full_cell(h, w):
    gen = torch.Generator().manual_seed(0)
    dst, src = partition(h, w, 2, 2, gen, torch.device("cpu"))
    assert dst.numel() == (h // 2) * (w // 2)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(h * w))
    rows, cols = dst // w, dst % w
    cells = set(zip((rows // 2).tolist(), (cols // 2).tolist(), strict=True))
    assert len(cells) == dst.numel() and all(r < (h // 2) * 2 and c < (w // 2) * 2 for r, c in zip(rows, cols,
                                                                                                   strict=True))
    fixed, _ = partition(h, w, 2, 2, None, torch.device("cpu"))
    assert torch.equal(fixed // w % 2, torch.zeros_like(fixed)) and torch.equal(fixed % w % 2, torch.zeros_like(fixed))


@pytest.mark.parametrize(("h", "w"), GRIDS)
def test_round_trip_exact_when_nothing_merged(h, w):
    x = torch.randn(3, h * w, 5)
    dst, src = partition(h, w, 2, 2, torch.Generator().manual_seed(1), x.device)
    tmap = bipartite(x, dst, src, 0)
    assert tmap.reduce(x).shape == x.shape
    assert torch.equal(tmap.expand(tmap.reduce(x)), x)


@pytest.mark.parametrize(("h", "w"), [(4, 4), (5, 7), (3, 3)])
def test_merge_averages_and_unmerge_copies(h, w):
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 6, dtype=torch.float64)
    dst, src = partition(h, w, 2, 2, None, x.device)
    r = min(int(h * w * 0.5), src.numel())
    tmap = bipartite(x, dst, src, r)
    reduced = tmap.reduce(x)
    assert reduced.shape == (2, h * w - r, 6)
    back = tmap.expand(reduced)
    for b in range(2):
        groups: dict[int, list[int]] = {}
        for token, row in enumerate((tmap.restore.view(2, -1)[b] - b * tmap.kept).tolist()):
            groups.setdefault(row, []).append(token)
        assert len(groups) == h * w - r
        for row, members in groups.items():
            mean = x[b, members].mean(0)
            assert torch.allclose(reduced[b, row], mean)
            assert all(torch.equal(back[b, t], reduced[b, row]) for t in members)
            if len(members) > 1:  # a merge group holds exactly one dst
                assert sum(int(t in set(dst.tolist())) for t in members) == 1


@pytest.mark.parametrize(("h", "w", "ratio"), [(4, 4, 0.5), (5, 7, 0.5), (6, 6, 0.75), (7, 3, 0.3)])
def test_same_merges_as_tomesd(h, w, ratio):
    merge = pytest.importorskip("tomesd.merge")
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 8)
    r = int(h * w * ratio)
    m, u = merge.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    dst, src = partition(h, w, 2, 2, None, x.device)
    tmap = bipartite(x, dst, src, r)
    assert torch.allclose(tmap.expand(tmap.reduce(x)), u(m(x)), atol=1e-6)


def test_refuses_impossible_merges():
    x = torch.randn(1, 4, 3)
    dst, src = partition(2, 2, 2, 2, None, x.device)
    with pytest.raises(ValueError, match="cannot merge"):
        bipartite(x, dst, src, 4)
    dst, src = partition(1, 4, 2, 2, None, x.device)  # no full cell: no dst
    with pytest.raises(ValueError, match="cannot merge"):
        bipartite(x, dst, src, 1)


def test_weighted_pagerank_ranks_the_attended_token_first():
    tokens = 6
    probs = torch.full((1, tokens, tokens), 0.02)
    probs[0, :, 2] = 0.9  # everyone attends to token 2
    probs[0, 2] = torch.tensor([0.1, 0.1, 0.1, 0.6, 0.05, 0.05])  # token 2 mostly attends to 3
    probs = probs / probs.sum(-1, keepdim=True)
    scores = weighted_pagerank(probs, 30)
    assert torch.allclose(scores.sum(-1), torch.ones(1, dtype=probs.dtype))
    order = scores[0].argsort(descending=True).tolist()
    assert order[:2] == [2, 3]
    one = weighted_pagerank(probs, 1)
    assert torch.allclose(one, probs.mean(1))  # one step from uniform: the column means


def test_prune_map_keeps_top_tokens_and_copies_the_most_attended_kept_one():
    torch.manual_seed(0)
    probs = torch.rand(2, 8, 8).softmax(-1)
    scores = torch.rand(2, 8)
    tmap = prune_map(probs, scores, 3)
    keep = scores.topk(3).indices.sort().values
    x = torch.randn(2, 8, 4)
    reduced = tmap.reduce(x)
    assert torch.equal(reduced, torch.stack([x[b, keep[b]] for b in range(2)]))
    back = tmap.expand(reduced)
    for b in range(2):
        for token in range(8):
            if token in keep[b]:
                assert torch.equal(back[b, token], x[b, token])
            else:
                source = keep[b][probs[b, token, keep[b]].argmax()]
                assert torch.equal(back[b, token], x[b, source])
