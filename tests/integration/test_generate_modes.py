"""generate() beyond greedy: beam search, models loaded with from_pretrained, chunked prefill, and image
features passed instead of pixels."""

import functools

import pytest
import torch
from families import FAMILIES
from helpers import PIPELINE, PRUNER_OPTIONS, apply, skip_if_refused
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.testing import surviving_positions


def beams(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_beam_search_keep_all_is_unpruned(model, inputs, name):
    expected = beams(model, inputs)
    with apply(model, name, keep=576):
        assert torch.equal(beams(model, inputs), expected)


def test_beam_search_on_shortened_prompt(model, inputs):
    with vtprune.apply(model, "divprune", keep=24) as handle:
        pruned = beams(model, inputs)
        kept = handle.last.kept[0]
    ids = inputs["input_ids"][0]
    keep = surviving_positions(ids, kept)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=[features[kept]])}
    manual = beams(model, {"input_ids": ids[keep][None]}, mm_encoder_outputs=encoded)
    assert torch.equal(pruned[:, ids.numel() :], manual[:, keep.sum() :])


def test_model_loaded_from_local_directory(model, inputs, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with vtprune.apply(model, "cls", keep=32) as h1, vtprune.apply(loaded, "cls", keep=32) as h2:
        with torch.no_grad():
            a, b = model(**inputs).logits, loaded(**inputs).logits
        assert torch.equal(h1.last.kept[0], h2.last.kept[0])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- chunked prefill and precomputed image features ------------------------------------------------------
FAMILY = {f.name: f for f in FAMILIES}
ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]


@functools.cache
def _family_model(name: str):
    return FAMILY[name].model()


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)


@pytest.mark.filterwarnings("ignore:the '.*' pruner.*has no CLS token")  # the substitute score
@pytest.mark.parametrize("name", sorted(PRUNER_OPTIONS) + [PIPELINE])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_chunked_prefill_with_images_is_refused_before_the_model_runs(family, name):
    skip_if_refused(family, name)
    model = _family_model(family)
    inputs, _ = FAMILY[family].batch(model, ONE_IMAGE)
    with apply(model, name, keep=16):
        expected = _generate(model, inputs)
        with pytest.raises(NotImplementedError, match=r"chunked prefill \(prefill_chunk_size\)"):
            _generate(model, inputs, prefill_chunk_size=8)
        assert torch.equal(_generate(model, inputs), expected)


def test_chunked_prefill_without_images_runs_under_a_pruner(model):
    text = {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13]])}
    expected = _generate(model, text)
    with apply(model, "fastv", keep=16):
        assert torch.equal(_generate(model, text, prefill_chunk_size=4), expected)


@pytest.mark.parametrize("name", ["uniform", "cls", "visionzip", "fastv"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_image_features_encoded_while_pruning_equal_the_pixel_path_and_others_are_refused(family, name):
    model = _family_model(family)
    inputs, _ = FAMILY[family].batch(model, ONE_IMAGE)
    pixels = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        outside = model.model.get_image_features(**pixels, return_dict=True)
    with apply(model, name, keep=16) as handle, torch.no_grad():
        expected, kept = model(**inputs).logits, handle.last.kept
        encoded = model.model.get_image_features(**pixels, return_dict=True)
        got = model(**rest, mm_encoder_outputs={"image": encoded}).logits
        assert torch.equal(got, expected) and all(torch.equal(a, b) for a, b in zip(handle.last.kept, kept))
        with pytest.raises(NotImplementedError, match="encoded without it"):
            model(**rest, mm_encoder_outputs={"image": outside})
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**rest, mm_encoder_outputs={"image": outside}).logits)
