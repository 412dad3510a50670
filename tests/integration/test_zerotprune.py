"""Zero-TPrune on timm ViTs: equal to a ViT run by hand with the method restated one token at a time
(PageRank over each block's attention, head filter, similarity stage, dropped tokens gone), fused ==
eager, batched == per image, identities, stats, remove(), bad options; the PageRank on graphs whose
answer is known."""

import pytest
import torch
from helpers import fused_eager_and_alone, timm_images, timm_vit
from references import zerotprune_drops

import vtprune
from vtprune.ops import attention_rank, importance_guided_drops, merge_origin, merge_weighted

timm = pytest.importorskip("timm")


def vit(**options):
    return timm_vit(**{"img_size": 32, **options})


def images():
    return timm_images(3, 32)


def hand_run(model, x, plan, pruner):
    """The ViT block by block: attention by hand, then ``plan[block]`` tokens dropped as the reference
    says, then the MLP on the tokens left."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for index, (block, r) in enumerate(zip(model.blocks, plan)):
        h, attn = block.norm1(x), block.attn
        batch, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(batch, n, -1))
        if r:
            steps = pruner.iterations_at(index, len(model.blocks))
            dropped = zerotprune_drops(probs, k.mean(1), r, steps, 1, pruner.variance_band)
            x = torch.stack([xs[[i for i in range(n) if i not in d]] for xs, d in zip(x, dropped)])
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize(
    "pruner", [vtprune.ZeroTPrune(r=2), vtprune.ZeroTPrune(keep=6, variance_band=None)], ids=["r2", "keep6"]
)
@torch.no_grad()
def test_equals_a_hand_run_vit_with_the_method_restated(pruner):
    model, x = vit(), images()  # 16 patches; 6 blocks: 30 PageRank steps in 0-2, 1 in 3-5
    plan = pruner.merge_plan(16, 1, 6)
    with vtprune.apply(model, pruner) as handle:
        out = model(x)
    assert handle.last.token_counts == [16 - sum(plan)] * 3 and handle.last.merged == [[], [], []]
    torch.testing.assert_close(out, hand_run(model, x, plan, pruner), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_fused_equals_eager_batched_equals_alone_and_identities():
    model, x = vit(reg_tokens=2, img_size=64), images()
    x = torch.nn.functional.interpolate(x, size=64)
    expected = model(x)
    for identity in (vtprune.ZeroTPrune(keep=1.0), vtprune.ZeroTPrune(r=0)):
        with vtprune.apply(model, identity):
            assert torch.equal(model(x), expected)
    with vtprune.apply(model, vtprune.ZeroTPrune(keep=8)) as handle:
        fused, eager, alone = fused_eager_and_alone(model, x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, eager, rtol=1e-4, atol=1e-5)
    assert handle.last.token_counts == [8] and handle.last.layer_tokens[0][0] == 64


def test_remove_restores_and_bad_options_are_refused():
    model, x = vit(), images()
    with torch.no_grad():
        expected = model(x)
        vtprune.apply(model, "zerotprune", keep=4).remove()
        assert torch.equal(model(x), expected) and vtprune.handle_of(model) is None
    cases = [
        (lambda: vtprune.ZeroTPrune(keep=4, r=2), "give keep .* or r .*, not both"),
        (lambda: vtprune.ZeroTPrune(iterations=(30, 5)), "iterations must be three ints >= 1"),
        (lambda: vtprune.ZeroTPrune(variance_band=(0.7, 0.01)), "variance_band must be"),
        (lambda: vtprune.ZeroTPrune(r=-1), "r must be an int >= 0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_pagerank_finds_the_token_everyone_attends_to():
    n = 6
    star = torch.full((1, 2, n, n), 0.02)
    star[..., 4] = 0.9  # every query attends mostly to token 4
    star = star / star.sum(-1, keepdim=True)
    importance = attention_rank(star, iterations=5, protected=1, variance_band=None)
    assert int(importance.argmax()) == 4
    uniform = torch.full((1, 2, n, n), 1 / n)  # uniform attention: every token alike after one step
    flat = attention_rank(uniform, iterations=1, protected=1, variance_band=None)
    torch.testing.assert_close(flat, torch.full((1, n), 1 / n))
    # a head outside the band is left out: only the star head decides
    mixed = torch.cat([star[:, :1], uniform[:, :1]], 1)
    torch.testing.assert_close(attention_rank(mixed, 5, 1, (0.01, 10.0)), attention_rank(star[:, :1], 5, 1, None))


def test_dropped_tokens_leave_no_trace_in_the_merge_bookkeeping():
    metric = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(0))
    importance = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    drops = importance_guided_drops(metric, importance, r=3, protected=1)
    assert (drops.into == -1).all() and drops.kept.shape == (2, 6) and (drops.kept[:, 0] == 0).all()
    for b in range(2):  # the dropped ones come from the less important half
        low = importance[b, 1:].argsort()[:4] + 1
        assert set(drops.merged[b].tolist()) <= set(low.tolist())
    x = torch.randn(2, 9, 5)
    out, size = merge_weighted(x, torch.ones(2, 9), drops)
    assert torch.equal(out, x.gather(1, drops.kept[..., None].expand(-1, -1, 5))) and (size == 1).all()
    origin = merge_origin(torch.arange(1, 9).expand(2, 8), drops)
    assert ((origin == -1).sum(-1) == 3).all()
