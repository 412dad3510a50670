"""VFlowOpt: its importance (the tower's global tokens' attention plus patch entropy) against the rule
computed from an eager tower's returned attention and a per-patch histogram; the stage before the
language model (kept tokens and importance-weighted recycled ones at their anchors) against a prompt
shortened by hand; a generation with its drops inside the language model against a hand-run decoder;
the budget arithmetic; settings files; option checks. The family matrix runs it everywhere."""

import math

import pytest
import torch
from helpers import prompt_with_image_tokens_at
from references import image_features, reference_generate, vflowopt_scores

import vtprune
from vtprune.core.schedule import layer_counts
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.vflowopt import PRESETS, VFlowOptPlan, cells_of
from vtprune.testing import IMAGE_TOKEN_ID

THRESHOLD = 1.03  # about ten global tokens in the tiny tower's nearly uniform attention


def recycled_by_hand(scores, features, budget, cell, grid=(24, 24)):
    """The stage before the LLM by hand: the best (budget - g) tokens stay, the others grouped by cell
    (g groups), each group's importance-weighted mean at its most important member."""
    scores.numel()
    cells = torch.tensor(
        [
            (r // cell) * (math.floor((grid[1] - 1) / cell) + 1) + c // cell
            for r in range(grid[0])
            for c in range(grid[1])
        ]
    )
    for groups in range(1, 64):
        order = scores.argsort(descending=True)
        kept = order[: budget - groups]
        rest = order[budget - groups :]
        if cells[rest].unique().numel() == groups:
            break
    members = [rest[cells[rest] == c] for c in cells[rest].unique().tolist()]
    anchors = [int(g[scores[g].argmax()]) for g in members]
    merged = [(scores[g, None] * features[g].double()).sum(0) / scores[g].sum() for g in members]
    stays = sorted(kept.tolist() + anchors)
    placed = {**{int(k): features[k].double() for k in kept}, **dict(zip(anchors, merged))}
    return torch.tensor(stays), torch.stack([placed[s] for s in stays]).float(), members, anchors


@pytest.mark.parametrize("entropy", [0.0, 0.5])
@torch.no_grad()
def test_the_stage_before_the_llm_equals_its_rule_fed_to_a_shortened_prompt(eager_model, inputs, entropy):
    pruner = vtprune.VFlowOpt(keep=0.25, vision_ratio=0.25, llm_ratio=1.0, threshold=THRESHOLD, cell=8, entropy=entropy)
    with vtprune.apply(eager_model, pruner) as handle:
        pruned = eager_model(**inputs).logits
    scores = vflowopt_scores(eager_model, inputs["pixel_values"], THRESHOLD, entropy)
    features = image_features(eager_model, inputs)
    stays, placed, members, anchors = recycled_by_hand(scores, features, 144, 8)
    assert handle.last.layer_tokens[0] == [144] * 4 and len(members) > 1
    expected = prompt_with_image_tokens_at(eager_model, inputs, stays, placed)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-4)
    reported = {int(g[0]): sorted(g.tolist()) for g in handle.last.merged[0]}
    assert reported == {a: sorted(g.tolist()) for a, g in zip(anchors, members)}


@torch.no_grad()
def test_generation_with_its_drops_equals_a_hand_run_decoder(eager_model, inputs):
    pruner = vtprune.VFlowOpt(keep=48, threshold=THRESHOLD, cell=8)
    with vtprune.apply(eager_model, pruner) as handle:
        out = eager_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    stats = handle.last
    entered = stats.drops[0][1][0]  # the tokens entering the LLM, named by their anchor
    assert [layer for layer, _ in stats.drops] == [0, 1, 3]
    scores = vflowopt_scores(eager_model, inputs["pixel_values"], THRESHOLD)
    _, placed, _, _ = recycled_by_hand(scores, image_features(eager_model, inputs), entered.numel(), 8)
    previous = entered
    for _layer, kept in stats.drops[1:]:  # each drop keeps the tokens of highest importance present
        expected = previous[scores[previous].topk(kept[0].numel()).indices.sort().values]
        assert torch.equal(kept[0], expected)
        previous = kept[0]
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    stays = torch.ones(ids.numel(), dtype=torch.bool)
    stays[image] = False
    stays[image[entered]] = True
    short = {"input_ids": ids[stays][None], "attention_mask": torch.ones(1, int(stays.sum()), dtype=torch.long)}
    drops = [(layer, torch.searchsorted(entered, kept[0])) for layer, kept in stats.drops[1:]]
    expected = reference_generate(eager_model, short, drops, 5, features=placed)
    assert torch.equal(out[0, -5:], expected[0, -5:])


def test_the_budget_is_the_mean_per_decoder_layer_and_the_presets_are_the_references():
    for layers, n, keep in [
        (32, 576, 64),
        (32, 576, 128),
        (28, 729, 0.25),
        (28, 729, 0.1),
        (4, 576, 32),
        (2, 576, 0.25),
        (1, 576, 64),
    ]:
        info = ModelInfo(layers, 24, True, "clip", (22,), n)
        plan = VFlowOptPlan(keep)
        plan.resolve(info)
        entered = round(plan.vision_ratio(n) * n)
        counts = layer_counts(plan.drop_points(entered), layers, entered)
        target = keep if isinstance(keep, int) else keep * n
        assert abs(sum(counts) / layers - target) <= 1.0, (layers, n, keep, counts)
    info = ModelInfo(28, 26, False, "siglip", (25,), 729)  # LLaVA-OneVision-7B, its 25% setting
    plan = VFlowOptPlan(0.25)
    plan.resolve(info)
    assert plan.settings == PRESETS[1] and plan.vision_ratio(729) == PRESETS[1].vision_ratio
    points = plan.drop_points(round(0.2651 * 729))
    assert [(p.layer, p.keep) for p in points] == [(9, 190), (18, 165)]
    assert cells_of((4, 5), 2.5, "cpu").tolist() == [0, 0, 0, 1, 1] * 3 + [2, 2, 2, 3, 3]


def test_settings_files_round_trip_and_bad_options_are_refused(tmp_path):
    path = tmp_path / "settings.json"
    PRESETS[0].save(path, samples=30)
    assert vtprune.VFlowOptSettings.load(path) == PRESETS[0]
    pruner = vtprune.VFlowOpt(keep=64, settings=str(path), cell=4.0)
    assert pruner.pruners[0].plan.given == PRESETS[0] and pruner.options()["cell"] == 4.0
    (tmp_path / "partial.json").write_text('{"vision_ratio": 0.2}')
    (tmp_path / "bad.json").write_text(path.read_text().replace('"vision_ratio": 0.11662', '"vision_ratio": 2'))
    cases = [
        (lambda: vtprune.VFlowOpt(settings=tmp_path / "none.json"), "cannot read VFlowOpt settings"),
        (lambda: vtprune.VFlowOpt(settings=tmp_path / "partial.json"), "not a VFlowOpt settings file"),
        (lambda: vtprune.VFlowOpt(settings=tmp_path / "bad.json"), "vision_ratio must be a number"),
        (lambda: vtprune.VFlowOpt(cell=0.5), "cell must be a number"),
        (lambda: vtprune.VFlowOpt(llm_ratio=1.5), "llm_ratios must be two numbers"),
        (lambda: vtprune.VFlowOpt(recycle="yes"), "recycle must be True or False"),
        (lambda: vtprune.VFlowOpt(keep=0), "keep must be >= 1"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_the_entropy_term_is_refused_where_the_tower_gets_no_pixel_images():
    from vtprune.testing import tiny_qwen2_vl

    model = tiny_qwen2_vl()  # its tower takes flattened patches
    with pytest.raises(ValueError, match="entropy term reads each patch's pixels.*use entropy=0"):
        vtprune.apply(model, "vflowopt", entropy=0.5)
    assert vtprune.handle_of(model) is None
    with vtprune.apply(model, "vflowopt"):  # the attention term alone runs
        pass


def test_a_cls_reading_pruner_beside_vflowopts_tower_rule_is_refused(model):
    # The tower's attention is scored once per forward: by VFlowOpt's rule or as the CLS row, not both.
    select = vtprune.VFlowOpt(keep=64).pruners[0]
    pipeline = vtprune.Pipeline([select, vtprune.MustDropFilter(keep=32)])
    with pytest.raises(ValueError, match=r"\['mustdrop.filter'\] read the tower's CLS attention.*use one or the other"):
        vtprune.apply(model, pipeline)
    assert vtprune.handle_of(model) is None
