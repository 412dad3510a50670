"""Every model family x every pruner: the core equivalences (see ``families.py`` for the families)."""

import pytest
import torch
from families import FAMILIES, assert_sdpa_equals_eager
from helpers import (
    PIPELINE,
    PRUNER_OPTIONS,
    TOWER,
    VISION,
    apply,
    assert_kept_as_scheduled,
    greedy,
    hooks_of,
    logits,
    pruned_image_tokens,
    skip_if_refused,
)

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID

# The whole matrix over six families: the fast lane keeps LLaVA-1.5's equivalences (test_equivalence.py).
pytestmark = pytest.mark.slow

ALL = sorted(PRUNER_OPTIONS) + [PIPELINE]
ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request):
    name = request.node.callspec.params.get("name")
    if name is not None:
        skip_if_refused(request.param.name, name)
    return request.param


def fixed_tokens(family, model, inputs) -> list[torch.Tensor]:
    """Per image, the positions among its tokens that are not image patches (LLaVA-NeXT's newline
    tokens), found by comparing the model's own features with its newline embedding."""
    features = family.image_features(model, inputs)
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return [torch.zeros(0, dtype=torch.long) for _ in features]
    return [(f == newline).all(-1).nonzero().flatten() for f in features]


def prunable_count(family, model, inputs) -> int:
    n_tokens = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    return n_tokens - int(fixed_tokens(family, model, inputs)[0].numel())


@pytest.mark.parametrize("name", ALL)
def test_keep_all_is_the_unpruned_model(family, name):
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    base_logits, base_tokens = logits(model, inputs), greedy(model, inputs)
    n = prunable_count(family, model, inputs)
    with apply(model, name, keep=1.0) as handle:
        pruned_logits, pruned_tokens = logits(model, inputs), greedy(model, inputs)
        assert torch.equal(handle.last.kept[0], torch.arange(n))
    torch.testing.assert_close(pruned_logits, base_logits, atol=1e-5, rtol=0)
    assert torch.equal(pruned_tokens, base_tokens)


def distinct_rows(x: torch.Tensor, atol: float = 1e-4) -> int:
    """Rows of ``x`` (n, D) farther than ``atol`` from every earlier row: a resampling that blends
    copies of one token gives it back up to rounding."""
    near = torch.cdist(x.double(), x.double()) < atol
    return sum(1 for i in range(x.shape[0]) if not near[i, :i].any())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("keep", [24, 0.2])
def test_kept_counts_match_keep(family, name, keep):
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    with apply(model, name, keep=keep) as handle:
        logits(model, inputs)
        if name in TOWER:  # one token per tower token: the distinct rows among the copies the tower gave
            features = family.image_features(model, inputs)[0]
            patches = torch.ones(features.shape[0], dtype=torch.bool)
            patches[fixed_tokens(family, model, inputs)[0]] = False
            stats, rows = handle.last, features[patches]
            assert stats.token_counts == [len(stats.kept[0]) + len(stats.merged[0])]
            for group in stats.merged[0]:  # a merged token's patches carry copies of its row
                assert distinct_rows(rows[group]) == 1
            covered = torch.cat([stats.kept[0], *stats.merged[0]]).sort().values
            if vtprune.registry.pruner_class(name).drops:  # dropped patches stand for no token
                rows = rows[covered]
            else:
                assert torch.equal(covered, torch.arange(rows.shape[0]))
            if family.name == "llava_onevision":  # its resampling may blend the same tokens alike twice
                assert distinct_rows(rows) <= stats.token_counts[0]
            else:
                assert stats.token_counts == [distinct_rows(rows)]
            if family.name == "llava":
                assert handle.last.token_counts == [vtprune.registry.pruner_class(name)(keep=keep).keep_count(576)]
        else:
            assert_kept_as_scheduled(model, handle, name, keep, n=prunable_count(family, model, inputs))


@pytest.mark.parametrize("name", ALL)
def test_remove_restores_the_model(family, name):
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    base = logits(model, inputs)
    hooks, forward = hooks_of(model), model.forward
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply(model, name, keep=16)
    logits(model, inputs)
    handle.remove()
    assert hooks_of(model) == hooks and model.forward == forward and vtprune.handle_of(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("name", ALL)
def test_sdpa_and_eager_agree(family, name):
    assert_sdpa_equals_eager(family, name, ONE_IMAGE, keep=24)


@pytest.mark.parametrize("name", ALL)
def test_batched_generation_with_text_only_and_two_images_equals_per_sample(family, name):
    model = family.model()
    samples = [([1, 5, 6, 7, 8, 9, 10], [], 0), ([1, 5], [7, 8], 2), ([1, 4, 4, 6, 6, 6], [9, 10, 11], 1)]
    batch, singles = family.batch(model, samples)
    with apply(model, name, keep=0.2) as handle:
        together = greedy(model, batch)
        kept_together = handle.last.kept
        for i, single in enumerate(singles):
            alone = greedy(model, single)
            assert torch.equal(together[i, -8:], alone[0, -8:]), f"sample {i} differs"
            if i:  # the text-only sample has no kept tokens to compare
                assert torch.equal(kept_together[i], handle.last.kept[0])


@pytest.mark.parametrize("name", VISION)
def test_vision_stage_equals_the_prompt_written_with_the_kept_tokens(family, name):
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    with apply(model, name, keep=20) as handle:
        pruned = logits(model, inputs)
        kept, groups = handle.last.kept[0], (handle.last.merged or [[]])[0]
    assert kept.numel() + len(groups) == 20
    # The reference: the unwrapped model fed only the kept patch tokens, every fixed token, and the
    # merged tokens (after the others, or at their anchors where tokens keep their positions).
    features = family.image_features(model, inputs)[0]
    is_fixed = torch.zeros(features.shape[0], dtype=torch.bool)
    is_fixed[fixed_tokens(family, model, inputs)[0]] = True
    keeps_positions = "mm_token_type_ids" in inputs
    stays, tokens = pruned_image_tokens(features, is_fixed, kept, groups, at_anchor=keeps_positions)
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    keep_pos = torch.ones(ids.numel(), dtype=torch.bool)
    keep_pos[image] = stays
    short_ids = ids[keep_pos][None]
    positions = {}
    if keeps_positions:  # M-RoPE: kept tokens and the text keep their original positions
        full, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
        positions = {"position_ids": full[:, :, keep_pos]}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short_ids)
        embeds[short_ids == IMAGE_TOKEN_ID] = tokens
        expected = model(inputs_embeds=embeds, **positions).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
