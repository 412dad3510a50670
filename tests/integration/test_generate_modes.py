"""generate() beyond greedy: beam search, and models loaded with from_pretrained."""

import pytest
import torch
from helpers import apply
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
