"""The lmms-eval model ``vtprune``, driven in-process with lmms-eval's own request objects."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra)")
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.models import get_model

import vtprune
from vtprune.evaluation import lmms_model
from vtprune.evaluation.lmms_model import VtpruneLMM
from vtprune.evaluation.options import parse_model_args
from vtprune.evaluation.prompts import chat_prompt
from vtprune.evaluation.task_data import COLOURS, SHAPES, draw_shape
from vtprune.testing import save_tiny_llava_hf

# The lmms-eval model on four families: the full suite (and CI) runs these; the fast lane does not.
pytestmark = pytest.mark.slow

TASK, SPLIT = "shapes", "test"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llava_hf(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def docs():
    import random

    rng = random.Random(0)
    images = [draw_shape(SHAPES[i % 3], list(COLOURS)[i % 4], 64, rng) for i in range(6)]
    questions = ["what shape is this ?", "what colour is the shape ?", "is there a red circle ?"]
    return [{"image": images[i], "question": questions[i % 3] + " what" * i} for i in range(6)]


def _lmm(tiny_dir, docs, **model_args) -> VtpruneLMM:
    lmm = VtpruneLMM(pretrained=str(tiny_dir), device="cpu", **model_args)
    lmm.task_dict = {TASK: {SPLIT: docs}}
    return lmm


def _visual(doc):
    return [doc["image"]] if doc.get("image") is not None else []


def _generate_requests(docs, gen_kwargs=None):
    gen_kwargs = gen_kwargs or {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    return [
        Instance(
            "generate_until",
            (doc["question"], dict(gen_kwargs), _visual, i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def _loglikelihood_requests(docs, continuations=("yes", "no", "red circle")):
    return [
        Instance(
            "loglikelihood",
            (doc["question"], continuations[i % len(continuations)], _visual, i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


def test_the_entry_point_registers_the_model():
    assert get_model("vtprune") is VtpruneLMM


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"pruner": "divprnue"}, "unknown pruner 'divprnue'; use one of: none, adaptive"),
        ({"pruner": "divprune", "keep": 0}, "keep must be >= 1"),
        ({"pruner": "fastv", "layer": "two"}, "layer"),
        ({"pruner": "divprune", "colour": 3}, "bad options for pruner 'divprune'"),
        ({"pruner": "none", "keep": 64}, "pruner=none takes no pruner options, got keep"),
        ({"batch_size": "0"}, "batch_size must be a positive integer"),
        ({"batch_size": "auto"}, "batch_size=auto is not supported"),
        ({"attn_implementation": "fast"}, "attn_implementation must be one of"),
    ],
)
def test_bad_model_args_fail_before_the_model_loads(monkeypatch, args, message):
    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(lmms_model, "load_model", no_loading)
    with pytest.raises((ValueError, TypeError), match=message):
        VtpruneLMM(pretrained="/nonexistent", **args)


def test_model_args_are_parsed_like_the_cli_passes_them():
    options = parse_model_args(pretrained="/m", pruner="fastv", keep=64, layer=2, batch_size="8", max_batch_size=None)
    assert (options.pruner, options.pruner_options, options.batch_size) == ("fastv", {"keep": 64, "layer": 2}, 8)
    assert options.pruner_config() == vtprune.FastV(keep=64, layer=2)
    with pytest.raises(ValueError, match="must include pretrained=PATH"):
        parse_model_args(pruner="divprune")


def test_a_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at .*expected a directory with config.json"):
        VtpruneLMM(pretrained=str(tmp_path / "missing"), device="cpu")


@pytest.mark.parametrize("pruner", ["divprune", "fastv"])
def test_batches_give_the_answers_and_scores_of_single_requests(tiny_dir, docs, pruner):
    single = _lmm(tiny_dir, docs, pruner=pruner, keep=16)
    batched = _lmm(tiny_dir, docs, pruner=pruner, keep=16, batch_size=4)
    one = single.generate_until(_generate_requests(docs))
    four = batched.generate_until(_generate_requests(docs))
    assert [r.text for r in four] == [r.text for r in one]
    assert all(isinstance(r, GenerationResult) and r.text for r in one)
    ll_one = single.loglikelihood(_loglikelihood_requests(docs))
    ll_four = batched.loglikelihood(_loglikelihood_requests(docs))
    for a, b in zip(ll_one, ll_four):
        assert a.text[1] == b.text[1]
        assert a.text[0] == pytest.approx(b.text[0], abs=1e-4)
    assert {c.token_counts.batch_size for c in four} == {4, 2}


def test_keep_all_scores_like_the_unpruned_model(tiny_dir, docs):
    unpruned = _lmm(tiny_dir, docs)
    keep_all = _lmm(tiny_dir, docs, pruner="divprune", keep=1.0, batch_size=3)
    assert [r.text for r in keep_all.generate_until(_generate_requests(docs))] == [
        r.text for r in unpruned.generate_until(_generate_requests(docs))
    ]
    for a, b in zip(
        keep_all.loglikelihood(_loglikelihood_requests(docs)), unpruned.loglikelihood(_loglikelihood_requests(docs))
    ):
        assert a.text == (pytest.approx(b.text[0], abs=1e-4), b.text[1])


def test_unpruned_loglikelihood_is_the_full_sequence_log_probability(tiny_dir, docs):
    """Without pruning: the sum of the continuation tokens' log-probabilities in one forward over
    prompt + continuation, and greedy when each of them is the argmax."""
    lmm = _lmm(tiny_dir, docs[:1])
    prompt = lmm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": docs[0]["question"]}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = lmm.processor(text=[prompt + "red circle"], images=[docs[0]["image"]], return_tensors="pt")
    with torch.no_grad():
        log_probs = torch.log_softmax(lmm.model(**inputs).logits[0].float(), -1)
    cont = inputs["input_ids"][0, -2:]
    expected = log_probs[-3:-1].gather(-1, cont[:, None]).sum().item()
    greedy = bool((log_probs[-3:-1].argmax(-1) == cont).all())
    (result,) = lmm.loglikelihood(_loglikelihood_requests(docs[:1], continuations=("red circle",)))
    assert result.text[0] == pytest.approx(expected, abs=1e-5) and result.text[1] == greedy


@pytest.mark.parametrize(("pruner", "options"), [("fastv", {"layer": 1}), ("divprune", {}), ("pdrop", {})])
def test_pruned_loglikelihood_scores_what_generate_would_produce(tiny_dir, docs, pruner, options):
    """The continuation generate() chose greedily scores the sum of generate()'s own log-probabilities
    and counts as greedy: the prompt is pruned as in generation, the answer cannot steer the pruner."""
    lmm = _lmm(tiny_dir, docs, pruner=pruner, keep=16, batch_size=4, **options)
    requests = _generate_requests(docs, {"max_new_tokens": 3})
    expected = []
    for request in requests:
        prompt = chat_prompt(lmm.processor, request.args[0], 1)
        inputs = lmm.processor(text=[prompt], images=[docs[request.args[3]]["image"]], return_tensors="pt")
        with torch.no_grad():
            out = lmm.model.generate(
                **inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        scores = torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.scores])
        expected.append((" " + lmm.tokenizer.decode(new), scores.gather(-1, new[:, None]).sum().item()))
    requests = _loglikelihood_requests(docs, continuations=[text for text, _ in expected])
    requests = [
        Instance("loglikelihood", (r.args[0], expected[i][0], *r.args[2:]), 0, r.metadata)
        for i, r in enumerate(requests)
    ]
    for result, (_, score) in zip(lmm.loglikelihood(requests), expected):
        assert result.text == (pytest.approx(score, abs=1e-4), True)
        counts, layers = result.token_counts, lmm.handle.last.layer_tokens[0]  # every sample: one image
        assert counts.mean_layer_visual_tokens == pytest.approx(sum(layers) / len(layers), abs=0.01)
        assert counts.kept_visual_tokens == layers[-1]
        if pruner == "divprune":  # a vision-stage pruner: the same 16 tokens in every layer
            assert counts.mean_layer_visual_tokens == 16


def test_answer_choices_that_share_a_prompt_share_one_row(tiny_dir, docs, monkeypatch):
    lmm = _lmm(tiny_dir, docs[:2], pruner="divprune", keep=16, batch_size=8)
    choices = ("yes", "no", "red", "red circle", "red square")
    requests = [
        Instance(
            "loglikelihood",
            (docs[d]["question"], c, _visual, d, TASK, SPLIT),
            0,
            {"task": TASK, "doc_id": d, "repeats": 1},
        )
        for d in range(2)
        for c in choices
    ]
    rows = []
    original = lmm._inputs
    monkeypatch.setattr(lmm, "_inputs", lambda texts, images: rows.append(len(texts)) or original(texts, images))
    shared = lmm.loglikelihood(requests)
    assert rows == [4]  # per document: one row for the one-token choices, one for "red ..."
    alone = [lmm.loglikelihood([r])[0] for r in requests]
    for a, b in zip(shared, alone):
        assert a.text == (pytest.approx(b.text[0], abs=1e-4), b.text[1])


def test_token_counts_report_what_pruning_kept(tiny_dir, docs):
    lmm = _lmm(
        tiny_dir, docs + [{"image": None, "question": "what is this ?"}], pruner="divprune", keep=16, batch_size=4
    )
    results = lmm.generate_until(_generate_requests(lmm.task_dict[TASK][SPLIT]))
    counts = [r.token_counts for r in results]
    assert [c.visual_tokens for c in counts] == [576] * 6 + [0]
    assert [c.kept_visual_tokens for c in counts] == [16] * 6 + [0]
    assert all(c.prefill_ms > 0 and 1 <= c.output_tokens <= 5 for c in counts)
    logged = counts[0].to_dict()
    assert {"visual_tokens", "kept_visual_tokens", "prefill_ms", "batch_size", "input_tokens"} <= set(logged)


def test_generation_stops_at_until_strings(tiny_dir, docs):
    lmm = _lmm(tiny_dir, docs)
    free = lmm.generate_until(_generate_requests(docs, {"max_new_tokens": 6}))
    first_word = free[0].text.split()[1]
    cut = lmm.generate_until(_generate_requests(docs, {"max_new_tokens": 6, "until": [first_word]}))
    assert cut[0].text == free[0].text[: free[0].text.index(first_word)]


def test_errors_surface_instead_of_empty_answers(tiny_dir, docs):
    lmm = _lmm(tiny_dir, [{"image": "clip.mp4", "question": "what happens ?"}])
    lmm.task_dict = {TASK: {SPLIT: [{"question": "what happens ?"}]}}
    request = Instance(
        "generate_until",
        ("what happens ?", {}, lambda doc: ["clip.mp4"], 0, TASK, SPLIT),
        idx=0,
        metadata={"task": TASK, "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(NotImplementedError, match="takes PIL images; got str"):
        lmm.generate_until([request])


def test_the_family_is_read_from_the_config():
    from transformers import LlamaConfig

    from vtprune.patches.loading import model_class_for
    from vtprune.testing import (
        tiny_fast_vlm,
        tiny_llava_next_video,
        tiny_llava_onevision,
        tiny_perception_lm,
        tiny_qwen2_vl,
    )

    families = (tiny_llava_next_video, tiny_llava_onevision, tiny_qwen2_vl, tiny_fast_vlm, tiny_perception_lm)
    for model in (*(build() for build in families), tiny_qwen2_vl(version="2.5")):
        assert model_class_for(model.config) is type(model)
    with pytest.raises(
        ValueError, match="vtprune cannot prune model_type 'llama'; supported: fast_vlm, llava, llava_next"
    ):
        model_class_for(LlamaConfig())


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl", "fast_vlm", "perception_lm"])
def test_other_families_batch_like_single_requests(tmp_path, docs, family):
    from vtprune import testing

    if family.startswith("qwen"):
        model_dir = testing.save_tiny_qwen2_vl_hf(tmp_path / family, version="2.5" if family == "qwen2_5_vl" else "2")
    else:
        model_dir = getattr(testing, f"save_tiny_{family}_hf")(tmp_path / family)
    single = _lmm(model_dir, docs, pruner="divprune", keep=0.25)
    batched = _lmm(model_dir, docs, pruner="divprune", keep=0.25, batch_size=4)
    classes = {
        "llava_next": "LlavaNext",
        "qwen2_vl": "Qwen2VL",
        "qwen2_5_vl": "Qwen2_5_VL",
        "fast_vlm": "FastVlm",
        "perception_lm": "PerceptionLM",
    }
    assert type(single.model).__name__ == f"{classes[family]}ForConditionalGeneration"
    one, four = single.generate_until(_generate_requests(docs)), batched.generate_until(_generate_requests(docs))
    assert [r.text for r in four] == [r.text for r in one]
    for a, b in zip(one, four):
        assert a.token_counts.visual_tokens == b.token_counts.visual_tokens > 0
        assert a.token_counts.kept_visual_tokens == b.token_counts.kept_visual_tokens
        assert a.token_counts.kept_visual_tokens == pytest.approx(0.25 * a.token_counts.visual_tokens, abs=6)
    for a, b in zip(
        single.loglikelihood(_loglikelihood_requests(docs)), batched.loglikelihood(_loglikelihood_requests(docs))
    ):
        assert a.text == (pytest.approx(b.text[0], abs=1e-4), b.text[1])
