"""ToMe on timm ViTs (the tower stage on its own): identity at keep 1.0, equal to a hand-run ViT with
ToMe's own merge code, fused == eager attention, batched == per-sample, stats, remove(), bad input."""

import pytest
import torch
from helpers import fused_eager_and_alone, timm_images, timm_vit
from references import pitome_matching, tome_matching

import vtprune

timm = pytest.importorskip("timm")


vit = timm_vit


MODELS = {
    "cls": {},
    "registers": {"reg_tokens": 4},
    "no_cls_avg_pool": {"class_token": False, "global_pool": "avg"},
}


images = timm_images


def tome_forward(model, x, r, distill_token=False, match=None, proportional=True):
    """The ViT run block by block as ToMe's timm patch does: proportional attention, merge after attention.
    ``r``: tokens merged per block, or a function of the tokens present; ``match(metric, r, block)``: the
    merge function (default ToMe's)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    protected = 2 if distill_token else 1
    for index, block in enumerate(model.blocks):
        h, attn = block.norm1(x), block.attn
        batch, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if size is not None and proportional:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1)
        x = x + attn.proj(y)
        count = min(r(n - protected) if callable(r) else r, (n - protected) // 2)
        if match is None:
            merge = tome_matching(k.mean(1), count, True, distill_token)
        else:
            merge = match(k.mean(1), count, index)
        size = torch.ones_like(x[..., :1]) if size is None else size
        x = merge(x * size, "sum")
        size = merge(size, "sum")
        x = x / size
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


@torch.no_grad()
def test_equals_a_hand_run_vit_with_tomes_own_merge_code():
    model, x = vit(), images()
    with vtprune.apply(model, vtprune.ToMe(r=6)) as handle:
        out = model(x)
    assert handle.last.layer_tokens[0] == [64, 58, 52, 46, 40, 34]
    torch.testing.assert_close(out, tome_forward(model, x, 6), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_deit_with_a_distillation_token_equals_tomes_own_code():
    torch.manual_seed(0)
    config = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    model, x = timm.models.deit.VisionTransformerDistilled(**config).eval(), images()
    assert model.num_prefix_tokens == 2
    with vtprune.apply(model, vtprune.ToMe(r=6)):
        out = model(x)
    torch.testing.assert_close(out, tome_forward(model, x, 6, distill_token=True), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_bfloat16_models_merge_in_their_dtype():
    model, x = vit().to(torch.bfloat16), images().to(torch.bfloat16)
    expected = model(x)
    with vtprune.apply(model, vtprune.ToMe(keep=1.0)):
        assert torch.equal(model(x), expected)
    with vtprune.apply(model, vtprune.ToMe(keep=0.5)) as handle:
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and handle.last.token_counts == [32] * 3


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("pruner", [vtprune.ToMe(keep=1.0), vtprune.ToMe(r=0)], ids=["keep1.0", "r0"])
@torch.no_grad()
def test_merging_nothing_is_the_unpruned_model_exactly(kind, pruner):
    model, x = vit(**MODELS[kind]), images()
    expected = model(x)
    with vtprune.apply(model, pruner) as handle:
        assert torch.equal(model(x), expected)
    assert handle.last.token_counts == [64] * 3 and handle.last.merged == [[], [], []]


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_fused_attention_equals_eager_and_batched_equals_per_sample(kind):
    model, x = vit(**MODELS[kind]), images()
    with vtprune.apply(model, vtprune.ToMe(keep=20)) as handle:
        fused, eager, alone = fused_eager_and_alone(model, x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, eager, rtol=1e-4, atol=1e-5)
    assert handle.last.token_counts == [20]  # the last forward was one image


@pytest.mark.parametrize("kind", MODELS)
@torch.no_grad()
def test_stats_account_for_every_patch_and_reach_keep(kind):
    model = vit(**MODELS[kind])
    with vtprune.apply(model, vtprune.ToMe(keep=0.25, layers=[1, 3, 5])) as handle:
        model(images())
    stats = handle.last
    assert stats.token_counts == [16] * 3
    assert stats.layer_tokens[0] == [64, 64, 48, 48, 32, 32]  # 16 merged after blocks 1, 3 and 5
    for kept, merged in zip(stats.kept, stats.merged):
        patches = torch.cat([kept, *merged]).sort().values
        assert patches.tolist() == list(range(64))


@torch.no_grad()
def test_remove_restores_the_model_exactly():
    model, x = vit(), images()
    expected, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    handle = vtprune.apply(model, vtprune.ToMe(keep=16))
    assert not torch.equal(model(x), expected)
    handle.remove()
    assert torch.equal(model(x), expected) and vtprune.handle_of(model) is None
    assert all("forward" not in block.__dict__ and not block.attn.qkv._forward_hooks for block in model.blocks)
    assert "forward_features" not in model.__dict__ and type(model) is timm.models.vision_transformer.VisionTransformer
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_a_keep_beyond_halving_once_per_block_matches_again_within_a_block():
    model, x = vit(), images()
    with vtprune.apply(model, vtprune.ToMe(keep=2, layers=[0, 1])) as handle:
        model(x)
    # 64 patches to 2 in two blocks needs five halvings: up to three matchings per block; the first
    # block merges what the second could not (64 -> 16; 16 -> 8 -> 4 -> 2)
    assert handle.last.layer_tokens[0] == [64, 16, 2, 2, 2, 2] and handle.last.token_counts == [2] * 3
    for kept, merged in zip(handle.last.kept, handle.last.merged):
        assert sorted(torch.cat([kept, *merged]).tolist()) == list(range(64))


def test_bad_options_and_wrong_stages_are_refused_before_the_model_is_touched():
    model = vit()
    cases = [
        (lambda: vtprune.ToMe(keep=16, r=4), "give keep .* or r .*, not both"),
        (lambda: vtprune.ToMe(r=-1), "r must be an int >= 0"),
        (lambda: vtprune.ToMe(layers=[3, 1]), "ascending"),
        (lambda: vtprune.PiToMe(keep=16, ratio=0.9), "give keep .* or ratio .*, not both"),
        (lambda: vtprune.PiToMe(ratio=0.3), r"ratio must be a float in \[0.5, 1\]"),
        (lambda: vtprune.PiToMe(margin=2), r"margin must be a number in \[-1, 1\]"),
        (lambda: vtprune.PiToMe(proportional="yes"), "proportional must be True or False"),
        (lambda: vtprune.apply(model, vtprune.ToMe(layers=[9])), r"layers=\[9\]: the tower has blocks 0 to 5"),
        (lambda: vtprune.apply(model, "divprune", keep=16), "takes one tower-stage pruner"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert vtprune.handle_of(model) is None and all("forward" not in b.__dict__ for b in model.blocks)


@torch.no_grad()
def test_a_forward_that_raises_midway_leaves_the_next_forward_clean():
    model, x = vit(), images()
    handle = vtprune.apply(model, vtprune.ToMe(keep=16))
    expected = model(x)

    def fail(*_):
        raise RuntimeError("boom")

    hook = model.blocks[3].mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    hook.remove()
    assert torch.equal(model(x), expected) and handle.last.token_counts == [16] * 3
    handle.remove()


@pytest.mark.parametrize("margin", [0.9, 0.75])
@torch.no_grad()
def test_pitome_equals_a_hand_run_vit_with_pitomes_own_algorithm(margin):
    model, x = vit(), images()  # 6 blocks: pitome_bsm in blocks 0-2, pitome in 3-5
    with vtprune.apply(model, vtprune.PiToMe(ratio=0.9, margin=margin)) as handle:
        out = model(x)
    assert handle.last.layer_tokens[0] == [64, 58, 53, 48, 44, 40]  # each block keeps 90%, rounded up

    def match(metric, r, block):
        mode = "pitome_bsm" if block < 3 else "pitome"
        return pitome_matching(metric, r, margin * (1 - block / 6), mode)

    expected = tome_forward(model, x, lambda t: int(t - t * 0.9), match=match, proportional=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
