"""A pruned model among the rest of the ecosystem: deepcopy, cache continuation, generate() modes,
static caches, accelerate's hooks, threads, output_hidden_states/attentions, subclasses, training."""

import copy
import threading

import pytest
import torch
from families import FAMILIES
from helpers import PIPELINE, PRUNER_OPTIONS, VISION, apply, greedy, hooks_of, logits

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs, make_prompt, surviving_positions, tiny_llava

ALL = sorted(PRUNER_OPTIONS)


def _prompts(model):
    return [
        make_prompt(model, [1, 5], [7, 8, 9]),
        make_prompt(model, [1, 5, 6, 13, 14, 15, 16], [7, 8, 9, 10, 11, 12]),
    ]


def generate(model, inputs, n=6, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


# -- 1. copy.deepcopy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_deepcopy_is_an_independent_pruned_model(model, inputs, name):
    unpruned = logits(model, inputs)
    with apply(model, name, keep=16) as handle:
        pruned = logits(model, inputs)
        clone = copy.deepcopy(model)
        clone_handle = vtprune.handle_of(clone)
        assert clone_handle is not None and clone_handle is not handle and clone_handle.active
        assert vtprune.handle_of(model) is handle
        assert torch.equal(logits(clone, inputs), pruned)
        assert torch.equal(clone_handle.last.kept[0], handle.last.kept[0])
        # The copy runs its own weights, not the original's.
        with torch.no_grad():
            clone.lm_head.weight.zero_()
        assert torch.count_nonzero(logits(clone, inputs)) == 0
        assert torch.equal(logits(model, inputs), pruned)
        # Removing the copy's pruning leaves the original pruned, and vice versa.
        clone_handle.remove()
        assert handle.active and torch.equal(logits(model, inputs), pruned)
        assert logits(clone, inputs).shape == unpruned.shape and "forward" not in clone.__dict__
    assert torch.equal(logits(model, inputs), unpruned)


def test_deepcopy_of_a_removed_model_is_unpruned(model, inputs):
    with apply(model, "divprune", keep=16):
        pass
    clone = copy.deepcopy(model)
    assert vtprune.handle_of(clone) is None
    assert torch.equal(logits(clone, inputs), logits(model, inputs))


# -- 2. continuing a pruned generate() from its cache ---------------------------------------------------
def _first_turn(model, inputs, n=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    more = torch.tensor([[40, 41, 42]]).expand(out.sequences.shape[0], -1)
    ids = torch.cat([out.sequences, more], dim=1)
    mask = torch.cat(
        [
            inputs["attention_mask"],
            torch.ones(ids.shape[0], ids.shape[1] - inputs["attention_mask"].shape[1], dtype=torch.long),
        ],
        1,
    )
    return out.past_key_values, ids, mask


# Pruners whose kept set depends on the prompt's text: starting over with more text chooses differently.
READS_PROMPT = ["fastv", *(n for n in VISION if vtprune.registry.pruner_class(n).reads_text)]


@pytest.mark.parametrize("name", [n for n in VISION if n not in READS_PROMPT])
def test_continuing_from_a_shortened_cache_equals_starting_over(model, name):
    inputs = batch_inputs(model, _prompts(model))
    with apply(model, name, keep=16):
        cache, ids, mask = _first_turn(model, inputs)
        continued = generate(model, {"input_ids": ids, "attention_mask": mask}, past_key_values=cache)
        scratch = generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]})
    assert torch.equal(continued, scratch)


@pytest.mark.parametrize("name", READS_PROMPT)
def test_continuing_equals_forward_steps_on_its_cache(model, inputs, name):
    """FastV's kept set depends on the prompt's last token and CDPruner's on the image's text, so
    starting over with more text would choose differently: the reference feeds the new text and
    decodes step by step on the same cache."""
    with apply(model, name, keep=16):
        cache, ids, mask = _first_turn(model, inputs)
        manual_cache = copy.deepcopy(cache)
        continued = generate(model, {"input_ids": ids, "attention_mask": mask}, n=4, past_key_values=cache)
        step = ids[:, -4:]  # the last generated token was never fed back, then the new text
        tokens = []
        with torch.no_grad():
            for _ in range(4):
                out = model(input_ids=step, past_key_values=manual_cache, use_cache=True)
                step = out.logits[:, -1:].argmax(-1)
                tokens.append(step)
    assert torch.equal(continued[:, -4:], torch.cat(tokens, dim=1))


def test_new_image_on_a_non_empty_cache_is_refused(model, inputs):
    with apply(model, "divprune", keep=16):
        cache, ids, mask = _first_turn(model, inputs)
        with pytest.raises(NotImplementedError, match="without pixel_values"):
            generate(
                model,
                {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"]},
                past_key_values=cache,
            )


# -- 3. generate() modes whose first forward is not exactly the prompt ------------------------------------
@pytest.mark.parametrize("name", ALL + [PIPELINE])
def test_assisted_and_no_cache_decoding_equal_greedy(model, inputs, name):
    assistant = tiny_llava(seed=1)
    with apply(model, name, keep=16) as handle:
        plain = generate(model, inputs)
        kept = handle.last.kept[0]
        assisted = generate(model, inputs, assistant_model=assistant)
        assert torch.equal(handle.last.kept[0], kept)
        no_cache = generate(model, inputs, use_cache=False)
        assert torch.equal(handle.last.kept[0], kept)
    assert torch.equal(assisted, plain)
    assert torch.equal(no_cache, plain)


def test_fastv_without_cache_batched_equals_with_cache(model):
    inputs = batch_inputs(model, _prompts(model))
    with apply(model, "fastv", keep=16):
        assert torch.equal(generate(model, inputs, use_cache=False), generate(model, inputs))


# -- 4. static caches --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VISION)
def test_static_cache_equals_dynamic_cache(model, name):
    for prompts in (_prompts(model), _prompts(model)[:1]):
        inputs = batch_inputs(model, prompts)
        with apply(model, name, keep=16):
            assert torch.equal(generate(model, inputs, cache_implementation="static"), generate(model, inputs))


def test_static_cache_is_refused_for_llm_stage_pruners(model, inputs):
    expected = logits(model, inputs)
    with apply(model, "fastv", keep=16):
        with pytest.raises(ValueError, match="cache_implementation='static'"):
            generate(model, inputs, cache_implementation="static")
    assert torch.equal(logits(model, inputs), expected)


# -- 5. accelerate -----------------------------------------------------------------------------------
def test_remove_under_accelerate_hooks_undoes_only_vtprune(inputs):
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model = tiny_llava()
    unpruned = logits(model, inputs)
    handle = vtprune.apply(model, "divprune", keep=16)
    pruned = logits(model, inputs)
    cpu_offload(model, execution_device="cpu")  # wraps model.forward, keeping vtprune's in _old_forward
    assert torch.equal(logits(model, inputs), pruned)
    handle.remove()
    assert torch.equal(logits(model, inputs), unpruned)
    remove_hook_from_module(model, recurse=True)
    assert torch.equal(logits(model, inputs), unpruned) and vtprune.handle_of(model) is None


def test_accelerate_hooks_removed_first_keep_pruning(inputs):
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model = tiny_llava()
    with vtprune.apply(model, "fastv", keep=16) as handle:
        pruned = logits(model, inputs)
        cpu_offload(model, execution_device="cpu")
        remove_hook_from_module(model, recurse=True)
        assert handle.active and torch.equal(logits(model, inputs), pruned)
    assert "forward" not in model.__dict__


def test_remove_says_when_its_patch_was_replaced(inputs):
    model = tiny_llava()
    unpruned = logits(model, inputs)
    handle = vtprune.apply(model, "fastv", keep=16)
    model.forward = type(model).forward.__get__(model)  # someone else replaced the patch, keeping nothing
    with pytest.raises(RuntimeError, match="no longer on the model"):
        handle.remove()
    assert not handle.active and vtprune.handle_of(model) is None  # every other step was undone
    assert torch.equal(logits(model, inputs), unpruned)


@pytest.mark.parametrize("apply_first", [True, False])
@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_accelerate_offload_equals_plain_pruned_model(inputs, tmp_path, name, apply_first):
    from accelerate import dispatch_model

    reference = tiny_llava()
    with vtprune.apply(reference, name, keep=16):
        expected, expected_tokens = logits(reference, inputs), greedy(reference, inputs)
    model = tiny_llava()
    layers = model.config.text_config.num_hidden_layers
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "lm_head": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
    }
    device_map.update({f"model.language_model.layers.{i}": "disk" if i == layers - 1 else "cpu" for i in range(layers)})
    handle = vtprune.apply(model, name, keep=16) if apply_first else None
    dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), force_hooks=True)
    handle = handle or vtprune.apply(model, name, keep=16)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, inputs), expected_tokens)
    handle.remove()


@pytest.mark.parametrize("offload", ["cpu_offload", "dispatch_model"])
@pytest.mark.parametrize("apply_first", [True, False])
@pytest.mark.parametrize("name", ["divprune", "transprune"])
@pytest.mark.parametrize("family_name", ["llava_next"])  # OneVision's SigLIP head fails offloaded unpruned too
def test_offloaded_model_with_its_own_weights_equals_on_device(tmp_path, family_name, name, apply_first, offload):
    # LLaVA-NeXT's image_newline is a parameter of the model itself, which accelerate loads only inside
    # its forward; vtprune (and generate()) encode images outside it.
    from accelerate import cpu_offload, dispatch_model

    family = next(f for f in FAMILIES if f.name == family_name)
    reference = family.model()  # shared by the tests; the offloaded model is a fresh one
    inputs, _ = family.batch(reference, [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)])
    with apply(reference, name, keep=16):
        expected, expected_tokens = logits(reference, inputs), greedy(reference, inputs)
    model = family.build(attn="sdpa")
    handle = apply(model, name, keep=16) if apply_first else None
    if offload == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    else:
        device_map = {"model": "disk", "lm_head": "cpu"}  # the whole model offloaded to disk
        dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), force_hooks=True)
    handle = handle or apply(model, name, keep=16)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, inputs), expected_tokens)
    handle.remove()


# -- 6. torch.compile ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_model_generates_like_eager():
    model = tiny_llava()
    # Alternating a single and a padded batch makes dynamo recompile and rebuild its guards over
    # vtprune's per-cache state (this crashed when that state was a WeakKeyDictionary).
    cases = [batch_inputs(model, _prompts(model)[:1]), batch_inputs(model, _prompts(model))]
    with vtprune.apply(model, "divprune", keep=16):
        expected = [generate(model, inputs) for inputs in cases]
        model.compile(backend="eager")
        for _ in range(3):
            for inputs, tokens in zip(cases, expected):
                assert torch.equal(generate(model, inputs), tokens)


@pytest.mark.slow
def test_apply_to_torch_compile_output_prunes_the_wrapped_model(inputs):
    model = tiny_llava()
    unpruned = logits(model, inputs)
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(logits(compiled, inputs), unpruned)
    with vtprune.apply(model, "divprune", keep=16):
        expected = logits(model, inputs)
    with vtprune.apply(compiled, "divprune", keep=16) as handle:
        assert vtprune.handle_of(compiled) is handle and vtprune.handle_of(model) is handle
        torch.testing.assert_close(logits(compiled, inputs), expected, atol=1e-5, rtol=0)
    assert torch.equal(logits(compiled, inputs), unpruned)


# -- 7. threads ----------------------------------------------------------------------------------------
def _in_two_threads(model, a, b) -> None:
    """Each input's greedy output, three times in each of two overlapping threads, equals its output alone."""
    expected = {"a": generate(model, a), "b": generate(model, b)}
    results, errors = {"a": [], "b": []}, []

    def run(key, inputs):
        try:
            for _ in range(3):
                results[key].append(generate(model, inputs))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key in expected:
        assert len(results[key]) == 3 and all(torch.equal(r, expected[key]) for r in results[key])


# cls, visionzip and todre read the vision tower while it runs: each thread must read its own images.
@pytest.mark.parametrize("name", ["fastv", "divprune", PIPELINE, "cls", "visionzip", "todre"])
def test_one_model_serves_two_threads(model, name):
    a = batch_inputs(model, _prompts(model)[:1], seed=1)
    b = batch_inputs(model, _prompts(model)[1:], seed=2)
    with apply(model, name, keep=16):
        _in_two_threads(model, a, b)


@pytest.mark.filterwarnings("ignore:the '.*' pruner.*has no CLS token")  # the substitute score
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cls", "visionzip", "todre"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llava_next", "qwen2_vl")], ids=lambda f: f.name)
def test_threads_with_tower_reading_pruners_on_other_families(family, name):
    model = family.model()
    one, _ = family.batch(model, [([1, 5], [8, 9, 10], 1)])
    two, _ = family.batch(model, [([1, 5], [8, 9, 10], 2)])  # other tower input shapes than one's
    with apply(model, name, keep=16):
        _in_two_threads(model, one, two)


# -- 8. hidden states and attentions keep one length ----------------------------------------------------
def test_fastv_hidden_states_have_the_prompt_length(model):
    inputs = batch_inputs(model, _prompts(model))
    with torch.no_grad():
        unpruned = model(**inputs, output_hidden_states=True).hidden_states
    with apply(model, "fastv", keep=16, layer=2), torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        plain = model(**inputs).logits
    stacked = torch.stack(out.hidden_states)  # one length for every layer
    assert stacked.shape[2] == inputs["input_ids"].shape[1]
    for i in range(3):  # the embeddings and layers 0-1 run before the drop
        assert torch.equal(out.hidden_states[i], unpruned[i])
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=0)


def test_fastv_attentions_have_the_prompt_length(eager_model):
    model = eager_model
    inputs = batch_inputs(model, _prompts(model))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        unpruned = model(**inputs, output_attentions=True).attentions
    with apply(model, "fastv", keep=16, layer=2) as handle, torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        kept = handle.last.kept
    assert all(a.shape[-2:] == (length, length) for a in attentions)
    for i in range(2):
        assert torch.equal(attentions[i], unpruned[i])
    for b in range(len(kept)):
        ids = inputs["input_ids"][b]
        visual = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
        survives = surviving_positions(ids, kept[b]) & inputs["attention_mask"][b].bool()
        dropped = visual[~survives[visual]]
        for a in attentions[2:]:
            assert torch.count_nonzero(a[b][:, dropped]) == 0 and torch.count_nonzero(a[b][:, :, dropped]) == 0
            rows = a[b][:, survives][:, :, survives].sum(-1)
            torch.testing.assert_close(rows, torch.ones_like(rows))


def test_fastv_generate_with_hidden_states_and_attentions(eager_model, inputs):
    with apply(eager_model, "fastv", keep=16), torch.no_grad():
        out = eager_model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_attentions=True,
        )
    length = inputs["input_ids"].shape[1]
    for step, (hidden, attentions) in enumerate(zip(out.hidden_states, out.attentions)):
        assert len({h.shape for h in hidden}) == 1
        assert {a.shape[-1] for a in attentions} == {length + step}


# -- 9. subclasses --------------------------------------------------------------------------------------
def test_subclasses_of_supported_models_are_accepted(model, inputs):
    from transformers import LlavaForConditionalGeneration

    class MyLlava(LlavaForConditionalGeneration):
        pass

    mine = MyLlava(model.config).eval()
    mine.load_state_dict(model.state_dict())
    with apply(model, "divprune", keep=16):
        expected = logits(model, inputs)
    with apply(mine, "divprune", keep=16):
        assert torch.equal(logits(mine, inputs), expected)
    assert type(mine) is MyLlava


# -- what already held, kept as regression tests ------------------------------------------------------
def _sample(model, inputs, **kwargs):
    torch.manual_seed(7)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0, num_return_sequences=3, **kwargs)


def test_sampling_with_several_return_sequences_equals_the_shortened_prompt(model, inputs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with apply(model, "divprune", keep=24) as handle:
        pruned = _sample(model, inputs)
        kept = handle.last.kept
    assert len(kept) == 3 and all(torch.equal(k, kept[0]) for k in kept)  # one choice per returned sequence
    ids = inputs["input_ids"][0]
    keep = surviving_positions(ids, kept[0])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=[features[kept[0]]])}
    manual = _sample(model, {"input_ids": ids[keep][None]}, mm_encoder_outputs=encoded)
    assert torch.equal(pruned[:, ids.numel() :], manual[:, int(keep.sum()) :])


def test_sampling_keep_all_fastv_is_unpruned(model, inputs):
    expected = _sample(model, inputs)
    with apply(model, "fastv", keep=576):
        assert torch.equal(_sample(model, inputs), expected)


def test_two_pruned_models_at_once(model, inputs):
    other = tiny_llava(seed=1)
    with apply(other, "divprune", keep=16):
        other_alone = logits(other, inputs)
    with apply(model, "fastv", keep=16):
        model_alone = logits(model, inputs)
    with apply(model, "fastv", keep=16), apply(other, "divprune", keep=16):
        assert torch.equal(logits(model, inputs), model_alone)
        assert torch.equal(logits(other, inputs), other_alone)


def test_save_pretrained_while_pruned_saves_the_model(model, tmp_path):
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "plain")
    with apply(model, "fastv", keep=16):
        model.save_pretrained(tmp_path / "pruned")
    plain, pruned = load_file(tmp_path / "plain/model.safetensors"), load_file(tmp_path / "pruned/model.safetensors")
    assert plain.keys() == pruned.keys() and all(torch.equal(plain[k], pruned[k]) for k in plain)
    assert (tmp_path / "plain/config.json").read_text() == (tmp_path / "pruned/config.json").read_text()


def test_training_gradients_equal_the_shortened_prompt():
    model = tiny_llava()
    model.train()
    model.activation_checkpointing_enable()
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6], [8, 9, 10, 11])])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    with vtprune.apply(model, "divprune", keep=16) as handle:
        model(**inputs, labels=labels).loss.backward()
        kept = handle.last.kept[0]
    pruned = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ids = inputs["input_ids"][0]
    keep = surviving_positions(ids, kept)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    embeds = model.get_input_embeddings()(ids[keep][None]).clone()
    embeds[0, ids[keep] == IMAGE_TOKEN_ID] = features[kept]
    model(inputs_embeds=embeds, labels=labels[0, keep][None]).loss.backward()
    manual = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert pruned.keys() == manual.keys()
    for n in manual:
        torch.testing.assert_close(pruned[n], manual[n], atol=1e-6, rtol=1e-5, msg=n)


class _Boom(RuntimeError):
    pass


def _explode(module, args, output):
    raise _Boom("boom")


@pytest.mark.parametrize("where", ["model.language_model.layers.3", "model.vision_tower.encoder.layers.0"])
@pytest.mark.parametrize("name", ["fastv", "cls", "divprune"])
def test_an_exception_in_a_layer_leaves_no_state(model, inputs, name, where):
    expected = logits(model, inputs)
    with apply(model, name, keep=16) as handle:
        pruned = logits(model, inputs)
        before = hooks_of(model)
        bomb = model.get_submodule(where).register_forward_hook(_explode)
        with pytest.raises(_Boom):
            logits(model, inputs)
        with pytest.raises(_Boom):
            greedy(model, inputs)
        bomb.remove()
        assert hooks_of(model) == before
        stage = handle._adapter._llm
        assert stage is None or not stage._calls._values
        assert not handle._adapter._generation.calls._values
        assert torch.equal(logits(model, inputs), pruned)
    assert torch.equal(logits(model, inputs), expected)
