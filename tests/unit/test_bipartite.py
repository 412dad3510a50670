"""ToMe's bipartite matching and size-weighted merging (``vtprune.ops.bipartite``) against a plain
per-sample loop written from the paper's description, and the invariants merging must keep."""

import pytest
import torch

from vtprune.ops.bipartite import (
    bipartite_matching,
    max_merges,
    max_merges_in,
    merge_origin,
    merge_weighted,
    proportional_bias,
    spread_merges,
    unmerge,
)


def loop_tome(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int):
    """One sample, literally: A = even positions, B = odd; each unprotected A token's most similar
    unprotected B token (cosine; the first on ties); the r best-linked A tokens merge into their partners
    as size-weighted means. Returns (kept positions, x, size) in ToMe's order: protected tokens, unmerged
    A tokens, B tokens."""
    n = metric.shape[0]
    unit = [m / m.norm() for m in metric.double()]
    a_side = [i for i in range(0, n, 2) if i >= protected]
    b_side = [j for j in range(1, n, 2) if j >= protected]
    links = []
    for i in a_side:
        sims = [float(unit[i] @ unit[j]) for j in b_side]
        best = max(range(len(sims)), key=lambda k: (sims[k], -k))
        links.append((sims[best], i, b_side[best]))
    order = sorted(range(len(links)), key=lambda k: (-links[k][0], links[k][1]))
    chosen = [links[k] for k in order[:r]]
    totals = {i: x[i].double() * size[i] for i in range(n)}
    weights = {i: float(size[i]) for i in range(n)}
    for _, i, j in chosen:
        totals[j] = totals[j] + totals[i]
        weights[j] += weights[i]
    unmerged_a = [links[k][1] for k in order[r:]]  # most similar first...
    if protected:
        unmerged_a.sort()  # ...unless tokens are protected: then by position, as ToMe with a CLS token
    kept = list(range(protected)) + unmerged_a + b_side  # ToMe's order
    return kept, torch.stack([totals[i] / weights[i] for i in kept]), torch.tensor([weights[i] for i in kept])


@pytest.mark.parametrize(("n", "r", "protected"), [(17, 5, 0), (17, 8, 1), (16, 3, 1), (21, 6, 5), (12, 6, 0)])
def test_matches_the_loop_reference_per_sample_and_in_a_batch(n, r, protected):
    torch.manual_seed(n * 31 + r)
    metric, x = torch.randn(3, n, 8), torch.randn(3, n, 5)
    size = torch.randint(1, 4, (3, n)).float()
    matching = bipartite_matching(metric, r, protected)
    merged_x, merged_size = merge_weighted(x, size, matching)
    for b in range(3):
        kept, want_x, want_size = loop_tome(metric[b], x[b], size[b], r, protected)
        assert matching.kept[b].tolist() == kept
        torch.testing.assert_close(merged_x[b].double(), want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_size[b].double(), want_size.double())
        alone = bipartite_matching(metric[b : b + 1], r, protected)  # batched == per-sample
        assert torch.equal(alone.kept[0], matching.kept[b]) and torch.equal(alone.into[0], matching.into[b])


def test_r_zero_is_the_identity():
    x, size = torch.randn(2, 9, 4), torch.ones(2, 9)
    matching = bipartite_matching(torch.randn(2, 9, 3), 0)
    assert matching.r == 0 and matching.kept.tolist() == [list(range(9))] * 2
    out, out_size = merge_weighted(x, size, matching)
    assert torch.equal(out, x) and torch.equal(out_size, size)


@pytest.mark.parametrize("protected", [1, 2, 5])
def test_protected_tokens_neither_merge_away_nor_absorb(protected):
    torch.manual_seed(protected)
    metric = torch.randn(4, 30, 6)
    metric[:, :protected] = metric[:, protected : 2 * protected]  # as similar as can be: still untouched
    matching = bipartite_matching(metric, 100, protected)  # r capped at the most one step can merge
    assert matching.r == max_merges(30, protected)
    assert (matching.merged >= protected).all() and (matching.into >= protected).all()
    assert (matching.kept[:, :protected] == torch.arange(protected)).all()  # and still first


def test_max_merges_is_half_the_unprotected_tokens():
    assert [max_merges(n) for n in (1, 2, 3, 577)] == [0, 1, 1, 288]
    assert max_merges(197, protected=1) == 98  # ViT-B/16 with a CLS token, as ToMe caps r
    assert max_merges(201, protected=5) == 98 and max_merges(3, protected=3) == 0


def test_sizes_add_up_and_merged_tokens_are_means_of_their_original_patches():
    """Merging the same features twice: every token is the plain mean of the original patches behind it
    (size-weighted means compose), its size counts them, and ``merge_origin`` names them."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 40, 6)
    x, size = x0, torch.ones(2, 40)
    origin = torch.arange(40).expand(2, 40)
    for r in (12, 9):
        matching = bipartite_matching(x, r, protected=1)
        x, size = merge_weighted(x, size, matching)
        origin = merge_origin(origin, matching)
    assert x.shape == (2, 40 - 21, 6) and (size.sum(-1) == 40).all()
    for b in range(2):
        for token in range(x.shape[1]):
            patches = (origin[b] == token).nonzero().flatten()
            assert len(patches) == size[b, token]
            torch.testing.assert_close(x[b, token], x0[b, patches].mean(0))


def test_proportional_attention_equals_attention_over_the_copies():
    """A token of size s with log(s) added to its logits gets the attention of s identical copies."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    copies = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # token 0 twice, token 2 three times
    expanded = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
    size = torch.bincount(copies).float()[None]
    biased = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=proportional_bias(size))
    torch.testing.assert_close(biased, expanded)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="metric must be a float tensor"):
        bipartite_matching(torch.randn(5, 3), 1)
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        bipartite_matching(torch.randn(1, 5, 3), -1)
    with pytest.raises(ValueError, match=r"protected must be an int in \[0, 5\]"):
        bipartite_matching(torch.randn(1, 5, 3), 1, protected=6)
    with pytest.raises(ValueError, match="x must be"):
        merge_weighted(torch.randn(1, 5, 3), torch.ones(1, 4), bipartite_matching(torch.randn(1, 5, 3), 1))


def test_spread_merges_reaches_keep_evenly_and_front_loads_the_remainder():
    assert spread_merges(576, 144, 4) == [108, 108, 108, 108]
    assert spread_merges(196, 100, 12, protected=1) == [8] * 12
    assert spread_merges(196, 90, 12, protected=1) == [9] * 10 + [8, 8]
    assert spread_merges(10, 10, 3) == [0, 0, 0]  # keep everything: the identity


def test_spread_merges_takes_more_early_when_later_steps_could_not_finish():
    assert spread_merges(100, 40, 2) == [30, 30]  # even shares fit under each step's cap
    # 27 each would leave 46 -> 23 after the last step's cap of half: the second step takes 33
    assert spread_merges(100, 20, 3) == [27, 33, 20]
    assert spread_merges(100, 13, 3) == [48, 26, 13]  # three halvings: 100 -> 52 -> 26 -> 13
    for n, keep, steps in ((577, 64, 8), (196, 20, 4), (50, 7, 3)):
        plan, present = spread_merges(n, keep, steps), n
        for r in plan:
            assert 0 <= r <= max_merges(present)
            present -= r
        assert present == keep
    with pytest.raises(ValueError, match="2 merge steps cannot bring 100 tokens down to 13"):
        spread_merges(100, 13, 2)
    with pytest.raises(ValueError, match=r"keep must be an int in \[1, 100\]"):
        spread_merges(100, 0, 2)


def test_spread_merges_with_several_matchings_per_step():
    assert max_merges_in(101, 1, 2) == 50 + 25 and max_merges_in(100, 0, 3) == 50 + 25 + 12
    # two halvings per step: the first step takes what the second could not (52 -> 26 -> 13)
    assert spread_merges(100, 13, 2, rounds=2) == [48, 39]
    assert spread_merges(100, 40, 2, rounds=3) == spread_merges(100, 40, 2)  # one matching was enough
    with pytest.raises(ValueError, match="each step merges at most half of them 2 times"):
        spread_merges(100, 3, 2, rounds=2)


def test_unmerge_gives_every_patch_its_tokens_row_and_keeps_the_prefix():
    torch.manual_seed(0)
    x0 = torch.randn(2, 21, 4)
    matching = bipartite_matching(x0, 8, protected=1)
    x, _ = merge_weighted(x0, torch.ones(2, 21), matching)
    origin = merge_origin(torch.arange(1, 21).expand(2, 20), matching)
    full = unmerge(x, origin, protected=1)
    assert full.shape == x0.shape and torch.equal(full[:, 0], x[:, 0])
    for b in range(2):
        for p in range(20):
            assert torch.equal(full[b, 1 + p], x[b, origin[b, p]])
    assert torch.equal(unmerge(x[..., 0], origin, protected=1), full[..., 0])  # any trailing shape


def test_energy_matching_merges_the_redundant_cluster_and_keeps_the_isolated_tokens():
    from vtprune.ops.energy import energy_matching

    torch.manual_seed(0)
    cluster = torch.randn(1, 1, 8) + 0.01 * torch.randn(1, 6, 8)  # six near-copies: high energy
    loners = torch.eye(8)[None, :4] * 5  # four orthogonal tokens: low energy
    metric = torch.cat([torch.randn(1, 1, 8), cluster, loners], dim=1)  # a CLS token first
    for mode in ("pitome", "pitome_bsm"):
        m = energy_matching(metric, 3, protected=1, margin=0.5, mode=mode)
        assert m.kept.shape == (1, 8) and m.kept[0, 0] == 0
        assert set(m.merged[0].tolist()) <= set(range(1, 7)) and set(m.into[0].tolist()) <= set(range(1, 7))
    identity = energy_matching(metric, 0, protected=1, margin=0.5, mode="pitome")
    assert identity.kept[0].tolist() == list(range(11)) and identity.r == 0
    with pytest.raises(ValueError, match=r"r must be an int in \[0, 5\]"):
        energy_matching(metric, 6, protected=1, margin=0.5, mode="pitome")
    with pytest.raises(ValueError, match="mode must be one of"):
        energy_matching(metric, 1, protected=1, margin=0.5, mode="tome")
