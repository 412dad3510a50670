"""Helpers shared by the integration tests: the pruner options of the test matrix, running a model,
and the expected results of a pruned forward. Lists of pruners come from the registry."""

import pytest
import torch

import vtprune

# Options of the test matrix where a pruner's defaults would not exercise it on the tiny models;
# every registered pruner is in the matrix, with its defaults unless listed here.
_OPTIONS = {
    "random": {"seed": 3},
    "fastv": {"layer": 2},
    "adaptive": {"mass": 0.6},
    "todre": {"threshold": 0.0},  # the late drop-all depends on the data: tests/integration/test_todre.py
    # 8x8 windows reach the matrix's keeps (16 of 576, or of a crop's 64) in the one block MustDrop
    # merges; its 3x3 default is tested in test_mustdrop_merge.py
    "mustdrop_merge": {"window": 8},
    "mustdrop": {"window": 8},  # its merge on the tiny video frames' 8x8 grids, pooled to 4x4
}
PRUNER_OPTIONS = {name: _OPTIONS.get(name, {}) for name in vtprune.available()}
VISION = sorted(n for n in PRUNER_OPTIONS if vtprune.registry.pruner_class(n).stage == "vision")
TOWER = sorted(n for n in PRUNER_OPTIONS if vtprune.registry.pruner_class(n).stage == "tower")
LLM = sorted(n for n in PRUNER_OPTIONS if vtprune.registry.pruner_class(n).stage == "llm")
IN_TOWER = sorted(n for n in PRUNER_OPTIONS if "tower" in vtprune.registry.pruner_class(n).stage)  # mustdrop too


def skip_if_refused(family: str, name: str, budget: str | None = None) -> None:
    """Skip the combinations vtprune refuses on purpose (their refusal is tested in test_tower_vlm.py)."""
    if name in IN_TOWER and family.startswith("qwen2"):
        pytest.skip("tower-stage pruners are refused on Qwen2-VL's tower (its 2x2 patch merger)")
    if name in IN_TOWER and family in ("fast_vlm", "perception_lm"):
        pytest.skip("tower-stage pruners are refused on timm towers (FastViT's convolutions, PE's pooling)")
    if name in TOWER and budget == "per_video":
        pytest.skip("tower-stage pruners count keep per frame (each frame passes the tower alone)")
    if name == "catp" and budget == "per_frame":
        pytest.skip("catp counts a video as one image (its refusal of per_frame is tested in test_catp.py)")
    if name in TOWER and family == "llava_onevision" and vtprune.registry.pruner_class(name).drops:
        pytest.skip("pruners that drop inside the tower are refused on OneVision (its resampling)")


PIPELINE = "divprune+fastv"  # a Pipeline in the test matrix: DivPrune keeps twice FastV's keep


def _twice(keep):
    return min(1.0, 2 * keep) if isinstance(keep, float) else 2 * keep


def apply(model, name, **options):
    if name == PIPELINE:
        keep = options.pop("keep")
        pruners = [vtprune.DivPrune(keep=_twice(keep), **options), vtprune.FastV(keep=keep, layer=2, **options)]
        return vtprune.apply(model, pruners)
    return vtprune.apply(model, name, **{**PRUNER_OPTIONS[name], **options})


def greedy(model, inputs, n=8):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def hooks_of(model):
    """Every hook on every submodule. transformers installs its own output-capturing hooks lazily on
    the first forward, so tests compare against a snapshot instead of expecting none."""
    return {
        (name, kind, key)
        for name, m in model.named_modules()
        for kind, hooks in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks), ("back", m._backward_hooks))
        for key in hooks
    }


def scheduled_count(model, name, keep, n=576):
    """Visual tokens of an n-token image that reach the last decoder layer under pruner ``name``
    (for ``adaptive``, the most it may keep)."""
    from vtprune.api import make_pruner
    from vtprune.patches import adapter_for

    if name == PIPELINE:
        entering = vtprune.DivPrune(keep=_twice(keep)).keep_count(n)
        return vtprune.FastV(keep=keep).keep_count(entering)
    pruner = make_pruner(name, **{**PRUNER_OPTIONS[name], "keep": keep})
    if isinstance(pruner, vtprune.Pipeline):  # a registered pipeline (todre, mustdrop): its first stage, then drops
        info = adapter_for(model).info
        pruner.check(info)
        entering = pruner.vision.keep_count(n) if pruner.vision is not None else pruner.tower.leaving(n)
        return min((pt.keep for p in pruner.llm for pt in p.drop_points(info, entering)), default=entering)
    if pruner.stage in ("vision", "tower"):  # tower: one image's patches on LLaVA-1.5's single grid
        return pruner.keep_count(n)
    points = pruner.drop_points(adapter_for(model).info, n)
    return points[-1].keep if points else n


def assert_kept_as_scheduled(model, handle, name, keep, n=576):
    expected = scheduled_count(model, name, keep, n)
    for count, layers in zip(handle.last.token_counts, handle.last.layer_tokens):
        assert count == layers[-1]
        assert count <= expected if name == "adaptive" else count == expected


def pruned_image_tokens(features, fixed, kept, groups, at_anchor: bool) -> tuple:
    """The reference for one image under a vision-stage pruner: which of its placeholders stay
    ((n,) bool) and the (stay, D) tokens they receive, from the features (n, D), the fixed tokens
    ((n,) bool), the kept prunable indices and the merged groups (prunable indices, anchor first).
    Merged tokens (their group's mean) follow the kept and fixed ones, or take their anchor's place."""
    prunable = (~fixed).nonzero().flatten()
    stays = fixed.clone()
    stays[prunable[kept]] = True
    tokens = features[stays]
    if not groups:
        return stays, tokens
    anchors = prunable[torch.stack([g[0] for g in groups])]
    merged = torch.stack([features[prunable[g]].mean(0) for g in groups])
    stays[anchors] = True
    if not at_anchor:
        return stays, torch.cat([tokens, merged])
    placed = features.clone()
    placed[anchors] = merged
    return stays, placed[stays]


def prompt_with_image_tokens_at(model, inputs, stays_at, features):
    """Logits of the prompt a user would write with only the image tokens at ``stays_at`` (indices
    among the one image's tokens, ascending), fed ``features`` (len(stays_at), D) in their places."""
    from vtprune.testing import IMAGE_TOKEN_ID

    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    stays = torch.ones(ids.numel(), dtype=torch.bool)
    stays[image] = False
    stays[image[stays_at]] = True
    short = ids[stays][None]
    embeds = model.get_input_embeddings()(short)
    embeds[short == IMAGE_TOKEN_ID] = features
    with torch.no_grad():
        return model(inputs_embeds=embeds).logits


def timm_vit(img_size=64, depth=6, **options):
    """A tiny timm ViT (8x8-pixel patches), seeded."""
    import timm

    torch.manual_seed(0)
    config = dict(img_size=img_size, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=7)
    return timm.models.vision_transformer.VisionTransformer(**{**config, **options}).eval()


def timm_images(n=3, size=64):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


def fused_eager_and_alone(model, x):
    """A timm ViT's outputs for ``x`` with fused attention, with eager attention, and image by image."""
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        eager = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    return fused, eager, alone


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
