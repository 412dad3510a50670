"""The adapter shared by LLaVA-style families: image features scattered into placeholder tokens.

A family (``llava.py``, ``llava_next.py``, ...) subclasses ``Adapter`` and says which model classes it
takes, how many visual tokens one image has, and how each image's tokens are laid out (``ImageParts``:
grids, tokens never pruned). Everything else is shared.

Instance-level patches (``MethodPatch``), all undone by ``remove()`` and copied by ``copy.deepcopy``:
- ``model.model.get_image_features`` also records, on each image's feature tensor, the patch grid and
  (when the pruner asks) the tower's CLS attention. ``generate()`` calls it before prefill and looks
  up its signature, which the patch keeps.
- ``model.forward`` locates each image's placeholder tokens from ``config.image_token_id`` and runs
  the vision stage (shortens the prompt) or scopes the LLM stage's decoder hooks; decode steps after
  a shortened prefill get their mask and positions mapped onto the shorter cache.
- ``model.generate`` records where the prompt ends (the LLM stage scores with the last prompt token
  even when the first forward holds more, as in assisted decoding or ``use_cache=False``).
- ``model.prepare_inputs_for_generation`` maps lengths between ``input_ids`` and a shortened cache
  when a ``generate()`` continues one, and keeps 2-D masks for static caches (mapped in ``forward``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.core.cache_state import CacheState
from vtprune.core.compaction import Compaction
from vtprune.core.generation import GenerateCall, continuation_length, prompt_length
from vtprune.core.image_parts import ImageParts
from vtprune.core.layout import VisualLayout
from vtprune.core.llm_stage import LLMStage
from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames
from vtprune.core.vision_stage import DecodeTranslation, select_in_parts, shorten_prompt
from vtprune.patches import llama, towers
from vtprune.pipeline import Pipeline, as_pipeline
from vtprune.pruners.base import ModelInfo, Reduction
from vtprune.registry import available, pruner_class
from vtprune.stats import PruneStats

# Attribute set on each image's (video's) feature tensor: its ImageParts (VideoFrames); on the encoder
# output too, for models whose videos come as one (videos, tokens, D) tensor.
_LAYOUT = "_vtprune_layout"
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def _is_static(cache) -> bool:
    """Caches with fixed slots (``cache_implementation="static"``, ``StaticCache``)."""
    return bool(getattr(cache, "is_compileable", False))


def _requested(a: dict, config, name: str) -> bool:
    """Whether a forward asks for ``output_hidden_states``/``output_attentions`` (argument, else config)."""
    value = a.get(name)
    value = getattr(config, name, None) if value is None else value
    return value is not None and value is not False


def _feature_layers(config, n_layers: int) -> tuple[int, ...]:
    """Encoder layers (0-based) whose outputs are the selected hidden states."""
    selected = config.vision_feature_layer
    selected = [selected] if isinstance(selected, int) else list(selected)
    # hidden_states[j] is the output of encoder layer j-1; hidden_states[0] is the embeddings.
    layers = [(j % (n_layers + 1)) - 1 for j in selected]
    return tuple(sorted({max(i, 0) for i in layers}))


class Adapter:
    """Attach the stages to one model instance. Subclasses set ``supported`` and implement
    ``visual_tokens`` and ``image_parts``."""

    supported: tuple[str, ...] = ()
    # Vision stage: whether kept tokens keep their original positions (M-RoPE families) instead of
    # closing up as in a prompt written with fewer image tokens; and per-token inputs that are
    # shortened together with input_ids.
    keeps_positions: bool = False
    token_aligned: tuple[str, ...] = ()

    @classmethod
    def supports(cls, model) -> bool:
        import transformers

        classes = tuple(getattr(transformers, name, None) for name in cls.supported)
        return isinstance(model, tuple(c for c in classes if c is not None))

    def visual_tokens(self) -> int | None:
        """Visual tokens of one image when every image has the same number (for ``ModelInfo``)."""
        return None

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        """The layout of each image's tokens, from ``get_image_features``' output and arguments.

        features: per image, its (n_tokens, D) tokens as the model scatters them; signals: what the
        pruner asked to read from the tower, per token of every tower input (images or crops, T
        tokens with the CLS), or None.
        """
        raise NotImplementedError

    def video_frames(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[VideoFrames]:
        """The layout of each video's tokens, from ``get_video_features``' output and arguments (as in
        ``image_parts``; ``signals`` over every frame the tower saw). Families with videos implement it."""
        raise NotImplementedError

    def vision_tower(self):
        return self.model.model.vision_tower

    def feature_layers(self, n_tower: int) -> tuple[int, ...]:
        """Encoder layers (0-based) whose outputs are the selected image features."""
        return _feature_layers(self.config, n_tower)

    def original_positions(self, a: dict) -> torch.Tensor | None:
        """(R, B, L) position ids of the full prompt, for families that keep them (``keeps_positions``)."""
        return None

    def shortened(self, comp: Compaction, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Called when the vision stage shortened a prompt whose tokens keep ``positions`` (R, B, L)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.tower = self.vision_tower()
        self.language_model = model.model.language_model
        self.decoder_layers = self.language_model.layers
        n_tower = towers.num_tower_layers(self.tower)
        self.info = ModelInfo(
            num_decoder_layers=len(self.decoder_layers),
            num_tower_layers=n_tower,
            tower_has_cls=towers.has_cls_token(self.tower),
            tower_name=type(self.tower).__name__,
            feature_layers=self.feature_layers(n_tower),
            visual_tokens=self.visual_tokens(),
        )
        self.last: PruneStats | None = None
        self._pipeline: Pipeline | None = None
        self._llm: LLMStage | None = None
        self._decode = CacheState("decode")
        self._generation = PerThread()  # GenerateCall of the generate() running in this thread
        has_videos = hasattr(model.model, "get_video_features") and getattr(self.config, "video_token_id", None)
        self.modalities = ("image", "video") if has_videos else ("image",)

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation or "eager"

    def check(self, config) -> None:
        pipeline = as_pipeline(config)
        pipeline.check(self.info)
        impl = self.attn_implementation
        for pruner in pipeline.llm:
            if "flex" in impl:
                raise ValueError(
                    f"the {pruner.name!r} pruner does not support attn_implementation={impl!r}; "
                    "use sdpa, eager or flash"
                )
        vision = pipeline.vision
        if vision is not None and vision.reads_tower(self.info) and towers.tower_spec(self.tower) is None:
            raise ValueError(
                f"the {vision.name!r} pruner cannot read attention from vision tower {self.info.tower_name}"
            )

    # -- installation ------------------------------------------------------------------------------
    def install(self, config) -> list:
        """Patch the model; returns the undo steps (bound methods, so a deep copy undoes its own)."""
        self._pipeline = pipeline = as_pipeline(config)
        undo = []
        try:
            for modality in self.modalities:
                encode = functools.partial(self._encoded_features, modality)
                undo.append(MethodPatch(self.model.model, f"get_{modality}_features", encode).undo)
            if pipeline.llm:
                flash = "flash" in self.attn_implementation
                self._llm = LLMStage(
                    pipeline.llm, self.decoder_layers, self.info, llama.query_key, llama.sublayers, flash
                )
                undo += [h.remove for h in self._llm.install()]
            undo.append(MethodPatch(self.model, "forward", self._patched_forward).undo)
            undo.append(MethodPatch(self.model, "generate", self._generate).undo)
            undo.append(MethodPatch(self.model, "prepare_inputs_for_generation", self._prepare_inputs).undo)
        except Exception:
            for u in reversed(undo):
                u()
            raise
        return undo

    def _encoded_features(self, modality: str, original, *args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
        vision = self._pipeline.vision
        score_layers = vision.tower_attention_layers(self.info) if vision is not None else []
        key_layers = vision.tower_key_layers(self.info) if vision is not None else []
        with contextlib.ExitStack() as stack:
            scores = stack.enter_context(towers.capture_cls_attention(self.tower, score_layers)) if score_layers else []
            keys = stack.enter_context(towers.capture_keys(self.tower, key_layers)) if key_layers else []
            out = original(*args, **kwargs)
        signals = TowerSignals.of(scores, keys)
        if isinstance(out, tuple):
            features = list(out[1])
        else:
            features = list(out.pooler_output)
        describe = self.image_parts if modality == "image" else self.video_frames
        layouts = describe(features, arguments, signals)
        for f, layout in zip(features, layouts):
            setattr(f, _LAYOUT, layout)
        if not isinstance(out, tuple):
            setattr(out, _LAYOUT, layouts)
        return out

    def _layouts_of(self, encoded, modality: str) -> list:
        """Each image's ``ImageParts`` (video's ``VideoFrames``) as recorded when it was encoded."""
        features = list(encoded.pooler_output)
        found = [getattr(f, _LAYOUT, None) for f in features]
        if all(x is not None for x in found):
            return found
        recorded = getattr(encoded, _LAYOUT, None)
        if recorded is not None and len(recorded) == len(features):
            return recorded
        if modality == "image":
            return [ImageParts.single(f.shape[0], None) for f in features]
        vision = self._pipeline.vision
        if vision is not None and vision.reads_tower(self.info):
            raise NotImplementedError(
                f"the {vision.name!r} pruner scores a video with what it reads in the tower, which is lost when "
                f"generate() repeats the video features (num_return_sequences > 1 or beam search) on "
                f"{type(self.model).__name__}; generate one sequence per prompt, or use another pruner"
            )
        # The features were repeated after encoding: their layout follows from their shape.
        return self.video_frames(features, {}, None)

    def _patched_forward(self, original, *args, **kwargs):
        a = dict(inspect.signature(original).bind(*args, **kwargs).arguments)
        a.update(a.pop("kwargs", {}))
        return self._forward(original, a)

    # -- generate() ----------------------------------------------------------------------------------
    def _generate(self, original, *args, **kwargs):
        length = prompt_length(inspect.signature(original).bind_partial(*args, **kwargs).arguments)
        if length is None:
            return original(*args, **kwargs)
        with self._generation.set(GenerateCall(prompt_length=length)):
            return original(*args, **kwargs)

    def _prepare_inputs(self, original, input_ids, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        translation = self._decode.get(cache)
        if translation is not None:
            kwargs["next_sequence_length"] = continuation_length(
                kwargs.get("next_sequence_length"), input_ids, cache, translation.shrink
            )
        inputs = original(input_ids, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        if _is_static(cache) and (mask is None or mask.dim() == 2):
            # generate() builds 4-D masks for static caches in the prompt's original layout; the
            # forward maps the 2-D one onto the shortened prompt and the model builds its own.
            inputs["attention_mask"] = mask
        return inputs

    # -- the forward -------------------------------------------------------------------------------
    def _forward(self, original, a: dict):
        cache = a.get("past_key_values")
        if self._llm is not None and _is_static(cache):
            raise ValueError(
                f"the {self._llm.pruners[0].name!r} pruner drops tokens inside the decoder, so its pruned layers hold "
                f"fewer tokens than a static cache's fixed slots: cache_implementation='static' (or a "
                f"{type(cache).__name__}) is not supported with it; use the default dynamic cache, or a "
                f"vision-stage pruner ({', '.join(_vision_pruner_names())})"
            )
        given = a.get("mm_encoder_outputs") or {}
        present = [m for m in self.modalities if a.get(_PIXELS[m]) is not None or given.get(m) is not None]
        if not present:
            return self._forward_without_images(original, a)
        input_ids = a.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "vtprune locates image tokens by input_ids; pass input_ids instead of inputs_embeds with images"
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "vtprune cannot prune images in a prompt that continues a non-empty KV cache (a new image in a "
                "later turn, or prefill_chunk_size); to continue a pruned generate() with more text, pass its "
                "past_key_values and the full token ids without pixel_values"
            )
        # The model refuses raw pixels of one modality next to encoded features of another: encode all.
        encoded = {m: given.get(m) if given.get(m) is not None else self._encode(a, m, _PIXELS[m]) for m in present}
        visuals = self._visuals(encoded)
        layout = self._layout(input_ids, [(v.modality, v.parts) for v in visuals])
        tail = self._tail_after_prompt(input_ids.shape[1])
        if self._pipeline.vision is None:
            grids = [visuals[i].parts.grid for items in layout.items for i in items]
            out, stats = self._llm_forward(original, a, layout, grids, tail)
            self.last = stats
            return out
        return self._vision_forward(original, a, encoded, visuals, layout, tail)

    def _visuals(self, encoded: dict) -> list[_Visual]:
        """What the stages prune as one image each, images first, then videos (per frame or whole)."""
        out = []
        for modality, output in encoded.items():
            features = list(output.pooler_output)
            for number, (f, layout) in enumerate(zip(features, self._layouts_of(output, modality))):
                if modality == "image":
                    out.append(_Visual(modality, number, f, layout))
                    continue
                start = 0
                for parts in layout.items(self._pipeline.budget):
                    out.append(_Visual(modality, number, f[start : start + parts.n_tokens], parts))
                    start += parts.n_tokens
        return out

    def _layout(self, input_ids: torch.Tensor, items: list[tuple[str, ImageParts]]) -> VisualLayout:
        """Where each item's (modality, parts) tokens sit in the prompt, items numbered in list order."""
        layouts = []
        for modality in dict.fromkeys(m for m, _ in items):
            mine = [parts for m, parts in items if m == modality]
            token_id = getattr(self.config, f"{modality}_token_id")
            layouts.append(
                VisualLayout.from_placeholders(
                    input_ids, token_id, [p.n_tokens for p in mine], [p.prunable for p in mine], modality
                )
            )
        return VisualLayout.merge(layouts)

    def _encode(self, a: dict, modality: str, pixels: str):
        """Run the model's own ``get_{modality}_features`` as its forward would, and hand the result
        to the forward as ``mm_encoder_outputs[modality]`` instead of the pixels."""
        encode = getattr(self.model.model, f"get_{modality}_features")
        # What the model's own forward passes on (image_sizes, batch_num_images, video_grid_thw, ...):
        # every argument of this forward that the encoder names.
        named = {n: a[n] for n in inspect.signature(encode).parameters if n in a and n != pixels}
        encoded = encode(**{pixels: a[pixels]}, **named, return_dict=True)
        a[pixels] = None
        a["mm_encoder_outputs"] = {**(a.get("mm_encoder_outputs") or {}), modality: encoded}
        return encoded

    def _tail_after_prompt(self, length: int) -> int | None:
        """Tokens after the last prompt token in this forward (assisted decoding's candidates, the
        tokens of ``use_cache=False``), when a ``generate()`` says where its prompt ends."""
        generating = self._generation.get()
        if generating is None or self._llm is None:
            return None
        if generating.prompt_length > length:
            raise NotImplementedError(
                f"the {self._llm.pruners[0].name!r} pruner scores with the prompt's last token, which this "
                f"forward ({length} of the prompt's {generating.prompt_length} tokens) does not hold: "
                f"chunked prefill (prefill_chunk_size) is not supported with it"
            )
        return length - generating.prompt_length

    def _llm_forward(self, original, a: dict, layout: VisualLayout, grids: list, tail: int | None) -> tuple:
        """Run the forward with the LLM stage's drops; returns the output and the stage's stats."""
        mask = a.get("attention_mask")
        generating = self._generation.get()
        score_row = None if tail is None else a["input_ids"].shape[1] - 1 - tail
        reuse = generating.kept if generating is not None else None
        restore = _requested(a, self.config, "output_hidden_states") or _requested(a, self.config, "output_attentions")
        key_mask = None if mask is None or mask.dim() != 2 else mask.bool()
        with self._llm.call(
            layout, key_mask, grids=grids, score_row=score_row, reuse=reuse, restore_outputs=restore
        ) as call:
            out = original(**a)
        if generating is not None:
            generating.kept = call.choices
        return out, call.stats

    def _forward_without_images(self, original, a: dict):
        translation = self._decode.get(a.get("past_key_values"))
        if translation is not None:
            cache = a["past_key_values"]
            q_len = a["input_ids"].shape[1] if a.get("input_ids") is not None else a["inputs_embeds"].shape[1]
            a["attention_mask"] = translation.attention_mask(a.get("attention_mask"), cache.get_seq_length() + q_len)
            a["position_ids"] = translation.position_ids(a.get("position_ids"))
        if self._llm is not None:
            restore = _requested(a, self.config, "output_attentions")
            with self._llm.call(None, None, restore_outputs=restore):
                return original(**a)
        return original(**a)

    def _vision_forward(self, original, a: dict, encoded: dict, visuals: list, layout: VisualLayout, tail):
        vision = self._pipeline.vision
        reductions = [select_in_parts(vision, v.features, v.parts) for v in visuals]
        per_item = [r.kept for r in reductions]
        # Placeholders that stay: the kept tokens' and, for each merged token, its anchor's.
        slots = [_slots(r) for r in reductions]
        input_ids = a["input_ids"]
        comp = Compaction.from_keep(layout.keep_mask(layout.per_sample(slots), input_ids.device))
        sample_kept = layout.sample_kept(layout.per_sample(per_item))
        merged = layout.sample_groups(layout.per_sample([r.groups for r in reductions]))
        self.last = PruneStats(
            kept=sample_kept,
            layer_tokens=[
                [int(k.numel()) + len(m)] * self.info.num_decoder_layers for k, m in zip(sample_kept, merged)
            ],
            merged=merged,
        )
        short = None
        if not comp.is_identity:
            positions = self.original_positions(a) if self.keeps_positions else a.get("position_ids")
            short = shorten_prompt(
                comp,
                input_ids,
                a.get("attention_mask"),
                None if self.keeps_positions else positions,
                a.get("labels"),
                self._pad_token_id(),
            )
            if self.keeps_positions:
                short["position_ids"] = torch.stack([comp.gather(row, fill=0) for row in positions])
                self.shortened(comp, positions, a.get("attention_mask"))
            for name in self.token_aligned:
                if a.get(name) is not None:
                    short[name] = comp.gather(a[name], fill=0)
            a.update({k: v for k, v in short.items() if k != "labels" or "labels" in a})
            pruned = _pruned_outputs(encoded, visuals, reductions, merged_at_anchor=self.keeps_positions)
            a["mm_encoder_outputs"] = {**a["mm_encoder_outputs"], **pruned}
        if self._llm is None:
            out = original(**a)
        else:
            remaining = [(v.modality, v.parts.after_keep(k)) for v, k in zip(visuals, per_item)]
            short_layout = self._layout(a["input_ids"], remaining)
            out, stats = self._llm_forward(original, a, short_layout, None, tail)
            # The LLM stage indexes the tokens that entered the LLM; report them among the original ones.
            self.last = PruneStats(
                kept=[v[k] for v, k in zip(sample_kept, stats.kept)],
                layer_tokens=stats.layer_tokens,
                # the vision stage is the first drop: before layer 0
                drops=[(0, sample_kept)]
                + [(layer, [v[k] for v, k in zip(sample_kept, kept)]) for layer, kept in stats.drops],
            )
        cache = getattr(out, "past_key_values", None)
        if cache is not None and short is not None:
            mask = short["attention_mask"]
            self._decode[cache] = DecodeTranslation(
                comp, None if mask is None or bool(mask.all()) else mask, shift_positions=not self.keeps_positions
            )
        return out

    def _pad_token_id(self) -> int:
        for cfg in (self.config, self.config.text_config):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None and pad != self.config.image_token_id:
                return int(pad)
        return 0 if self.config.image_token_id != 0 else 1


def _vision_pruner_names() -> list[str]:
    return [name for name in available() if pruner_class(name).stage == "vision"]


@dataclass(frozen=True)
class _Visual:
    """One image, or one video frame (or whole video), as the stages prune it: ``features`` (n, D)
    its tokens as the model scatters them, ``parts`` their layout; ``number``: the image's (video's)
    index among the encoder's outputs."""

    modality: str
    number: int
    features: torch.Tensor
    parts: ImageParts


def _slots(r: Reduction) -> torch.Tensor:
    """Prunable indices whose placeholders stay for a reduction: kept tokens and merged tokens' anchors."""
    if not r.groups:
        return r.kept
    return torch.cat([r.kept, r.anchors.to(r.kept.device)]).sort().values


def _image_tokens(v: _Visual, r: Reduction, merged_at_anchor: bool) -> torch.Tensor:
    """(k + fixed + merged, D): what the model gets for one image: kept and fixed tokens in prompt
    order, then each merged token (the mean of its group), or, with ``merged_at_anchor``, each merged
    token at its anchor's place."""
    f = v.features
    staying = v.parts.token_positions(r.kept)
    kept = f[staying.to(f.device)]
    if not r.groups:
        return kept
    prunable = v.parts.prunable
    merged = torch.stack([f[prunable[g.cpu()].to(f.device)].float().mean(0) for g in r.groups]).to(f.dtype)
    tokens = torch.cat([kept, merged])
    if not merged_at_anchor:
        return tokens
    # Order by place in the prompt: the anchors' token positions next to the kept and fixed ones.
    places = torch.cat([staying, prunable[r.anchors.cpu()]])
    return tokens[places.argsort().to(f.device)]


def _pruned_outputs(encoded: dict, visuals: list[_Visual], reductions: list[Reduction], merged_at_anchor: bool) -> dict:
    """The encoder outputs holding what each image (video) keeps and merges, one (n_i, D) tensor per
    image (video) as the models take them; where the encoder gave one (videos, tokens, D) tensor, a
    (1, total, D) tensor instead (the models flatten it)."""
    tokens = {m: {} for m in encoded}
    for v, r in zip(visuals, reductions):
        tokens[v.modality].setdefault(v.number, []).append(_image_tokens(v, r, merged_at_anchor))
    out = {}
    for modality, per_number in tokens.items():
        pooler = [torch.cat(parts) for parts in per_number.values()]
        if isinstance(encoded[modality].pooler_output, torch.Tensor):
            pooler = torch.cat(pooler)[None]
        out[modality] = BaseModelOutputWithPooling(pooler_output=pooler)
    return out
