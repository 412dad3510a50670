"""The public surface: names, validation before anything is touched, exact removal."""

import warnings

import pytest
import torch
from families import FAMILIES, VIDEO_FAMILIES
from helpers import PIPELINE, PRUNER_OPTIONS, apply, greedy, hooks_of, logits

import vtprune


@pytest.fixture(autouse=True)
def warm(model, inputs):
    logits(model, inputs)  # let transformers install its own hooks before any snapshot


def test_every_registered_pruner_is_a_public_class_named_after_its_registry_name():
    assert vtprune.available() == sorted(PRUNER_OPTIONS)
    for name in vtprune.available():
        cls = vtprune.registry.pruner_class(name)
        assert cls.name == name and getattr(vtprune, cls.__name__) is cls and cls.__name__ in vtprune.__all__


@pytest.mark.parametrize("name", sorted(PRUNER_OPTIONS) + [PIPELINE])
def test_remove_restores_model_exactly(model, inputs, name):
    before_logits = logits(model, inputs)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_dict = set(model.__dict__)
    before_hooks = hooks_of(model)
    handle = apply(model, name, keep=16)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    logits(model, inputs)
    greedy(model, inputs, n=2)
    handle.remove()
    handle.remove()  # idempotent
    assert hooks_of(model) == before_hooks
    assert set(model.__dict__) == before_dict
    assert "forward" not in model.__dict__ and "get_image_features" not in model.model.__dict__
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert torch.equal(logits(model, inputs), before_logits)


def test_state_dict_and_type_unchanged_while_applied(model):
    keys = list(model.state_dict())
    before_hooks = hooks_of(model)
    with vtprune.apply(model, "divprune", keep=8) as handle:
        assert isinstance(handle, vtprune.PruneHandle)
        assert list(model.state_dict()) == keys
        assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert hooks_of(model) == before_hooks and not handle.active


def test_config_object_and_name_are_equivalent(model, inputs):
    with vtprune.apply(model, vtprune.DivPrune(keep=24)) as h:
        a = logits(model, inputs)
        kept_a = h.last.kept[0]
    with vtprune.apply(model, "divprune", keep=24) as h:
        b = logits(model, inputs)
        kept_b = h.last.kept[0]
    assert torch.equal(kept_a, kept_b) and torch.equal(a, b)


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("divprune", {"keep": 0}, ValueError, "keep must be >= 1"),
        ("divprune", {"keep": -3}, ValueError, "keep must be >= 1"),
        ("divprune", {"keep": 0.0}, ValueError, "in (0, 1]"),
        ("divprune", {"keep": 1.5}, ValueError, "in (0, 1]"),
        ("divprune", {"keep": True}, TypeError, "keep must be an int"),
        ("divprune", {"keep": "64"}, TypeError, "keep must be an int"),
        ("nope", {}, ValueError, "available: " + ", ".join(vtprune.available())),
        ("fastv", {"layer": 0}, ValueError, "layer must be an int in [1, 3]"),
        ("fastv", {"layer": 4}, ValueError, "layer must be an int in [1, 3]"),
        ("fastv", {"layer": -1}, ValueError, "layer must be an int in [1, 3]"),
        ("cls", {"layers": [7]}, ValueError, "outside the 3-layer vision encoder"),
        ("cls", {"strategy": "best"}, ValueError, "strategy must be one of"),
        ("divprune", {"kepp": 3}, TypeError, "it takes keep, budget, crop_budget, backend"),
        ("todre", {"kepp": 3}, TypeError, "it takes keep, layer, threshold, backend, budget"),
    ],
)
def test_bad_input_fails_before_touching_model(model, name, options, error, message):
    before_hooks = hooks_of(model)
    with pytest.raises(error) as info:
        vtprune.apply(model, name, **options)
    assert message in str(info.value)
    assert hooks_of(model) == before_hooks and "forward" not in model.__dict__
    assert getattr(model, "_vtprune_handle", None) is None


def test_second_apply_is_refused(model):
    with vtprune.apply(model, "random", keep=4):
        before_hooks = hooks_of(model)
        with pytest.raises(ValueError, match="already has vtprune applied"):
            vtprune.apply(model, "divprune", keep=4)
        assert hooks_of(model) == before_hooks  # the refused call added nothing
    with vtprune.apply(model, "divprune", keep=4):  # after removal it works again
        pass


@pytest.mark.slow
def test_every_supported_class_has_a_family_in_the_test_matrix():
    built = {type(family.model()).__name__ for family in (*FAMILIES, *VIDEO_FAMILIES)}
    assert built == set(vtprune.supported_classes())


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    with pytest.raises(TypeError, match="supported model classes: " + ", ".join(vtprune.supported_classes())):
        vtprune.apply(lm, "divprune", keep=4)
    assert not lm._forward_pre_hooks


def _subclass_of_llava(module: str):
    """A tiny LLaVA whose class is a subclass of LlavaForConditionalGeneration defined in ``module``."""
    from transformers import LlavaForConditionalGeneration

    from vtprune.testing import tiny_llava

    model = tiny_llava(image_size=56)
    model.__class__ = type("OtherVlmForConditionalGeneration", (LlavaForConditionalGeneration,), {"__module__": module})
    return model


def test_a_transformers_family_built_on_a_supported_class_is_refused_not_run_as_that_family():
    model = _subclass_of_llava("transformers.models.other_vlm.modeling_other_vlm")  # as a future family would be
    with pytest.raises(TypeError, match="OtherVlmForConditionalGeneration subclasses LlavaForConditionalGeneration"):
        vtprune.apply(model, "divprune", keep=4)
    assert not hooks_of(model) and "forward" not in model.__dict__


def test_a_users_own_subclass_of_a_supported_class_is_pruned_as_that_class():
    from vtprune.testing import batch_inputs, make_prompt, tiny_llava

    mine, plain = _subclass_of_llava(__name__), tiny_llava(image_size=56)
    inputs = batch_inputs(plain, [make_prompt(plain, [1, 5], [8, 9])])
    with vtprune.apply(mine, "divprune", keep=4) as a, vtprune.apply(plain, "divprune", keep=4) as b:
        torch.testing.assert_close(mine(**inputs).logits, plain(**inputs).logits, rtol=0, atol=0)
    assert a.last.layer_tokens == b.last.layer_tokens == [[4] * 4]


def test_options_with_config_object_are_refused(model):
    with pytest.raises(TypeError, match="set them on the object"):
        vtprune.apply(model, vtprune.DivPrune(keep=4), keep=8)


def test_cls_on_a_tower_without_cls_scores_the_attention_each_patch_receives():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    import vtprune.pruners.cls as cls_module

    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            image_size=56,
            patch_size=14,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=40
        ),
        image_token_id=39,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    inputs = {"input_ids": torch.tensor([[1, 2] + [39] * 16 + [3]]), "pixel_values": torch.randn(1, 3, 56, 56)}
    cls_module._WARNED.discard(("cls", "SiglipVisionModel"))
    with pytest.warns(UserWarning, match="SiglipVisionModel has no CLS token") as warned:
        handle = vtprune.apply(model, "cls", keep=5)
    assert warned[0].filename == __file__  # points at the user's apply() call
    with handle, torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    received = attentions[1][0].mean(0).mean(0)  # last encoder layer: head mean, then query mean
    assert torch.equal(handle.last.kept[0], received.topk(5).indices.sort().values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tower class
        vtprune.apply(model, "cls", keep=5).remove()
