"""The adapter shared by LLaVA-style families: image features scattered into placeholder tokens.

A family (``llava.py``, ``llava_next.py``, ...) subclasses ``Adapter`` and says which model classes it
takes and how each image's tokens are laid out (``ImageParts``: grids, tokens never pruned). The
adapter installs instance-level patches (``MethodPatch``; undone by ``remove()``, copied by
``copy.deepcopy``): ``get_image_features`` (records each image's layout and what the pruner reads in
the tower), ``forward`` (locates the placeholders from ``config.image_token_id``, runs the vision stage
or scopes the LLM stage's hooks, maps decode steps onto a shortened cache), and ``generate`` /
``prepare_inputs_for_generation`` (``core/generation.py``). The stages themselves live in ``core/``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtprune.core.compaction import Compaction
from vtprune.core.decode_stage import DecodeStage
from vtprune.core.decoder import DecoderAccess
from vtprune.core.generation import Generation, is_static
from vtprune.core.image_parts import ImageParts
from vtprune.core.layout import VisualLayout
from vtprune.core.llm_stage import LLMStage
from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.stats import PruneStats
from vtprune.core.tokens import ModelInfo
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames, tokens_in_slots
from vtprune.core.vision_stage import Prompt, VisionStage, Visual, visuals_of
from vtprune.patches import towers
from vtprune.patches.llama import LLAMA
from vtprune.patches.offload import weights_loaded
from vtprune.patches.tower_merging import TowerMerging, check_tower_merging
from vtprune.pruners.pipeline import Pipeline, as_pipeline
from vtprune.registry import available, pruner_class

# Attribute set on each image's (video's) feature tensor: its ImageParts (VideoFrames); on the encoder
# output too, for models whose videos come as one (videos, tokens, D) tensor.
_LAYOUT = "_vtprune_layout"
# Attribute set on the encoder output: each image's (video's) tokens as encoded, which tells its layout
# again when generate() repeats the features (num_return_sequences) into new tensors.
_ITEMS = "_vtprune_items"
# Attribute set on the encoder output when its rows are not one image (video) each (``feature_items``).
_GROUPED = "_vtprune_grouped"
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def _requested(a: dict, config, name: str) -> bool:
    """Whether a forward asks for ``output_hidden_states``/``output_attentions`` (argument, else config)."""
    value = a.get(name)
    value = getattr(config, name, None) if value is None else value
    return value is not None and value is not False


def nearest_transformers_class(kind: type) -> str | None:
    """The name of the first class in ``kind``'s method resolution order that transformers defines."""
    return next((c.__name__ for c in kind.__mro__ if c.__module__.split(".")[0] == "transformers"), None)


def selected_layers(vision_feature_layer: int | list[int], n_tower: int) -> tuple[int, ...]:
    """The encoder layers (0-based) whose outputs a LLaVA-style config's ``vision_feature_layer``
    selects (an index, or indices, into the tower's hidden states) in an ``n_tower``-layer tower."""
    selected = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    # hidden_states[j] is the output of encoder layer j-1; hidden_states[0] is the embeddings.
    return tuple(sorted({max((j % (n_tower + 1)) - 1, 0) for j in selected}))


class Adapter:
    """Attach the stages to one model instance. Subclasses set ``supported`` and implement
    ``visual_tokens`` and ``image_parts``."""

    supported: tuple[str, ...] = ()
    # Vision stage: whether kept tokens keep their original positions (M-RoPE families) instead of
    # closing up as in a prompt written with fewer image tokens; and per-token inputs that are
    # shortened together with input_ids.
    keeps_positions: bool = False
    token_aligned: tuple[str, ...] = ()
    # Tower stage: why patches dropped inside the tower cannot go through this family ("": they can).
    no_tower_drops: str = ""

    @classmethod
    def supports(cls, model) -> bool:
        """Whether the model's nearest transformers class is one of ``supported``: a user's own subclass
        of a supported class is claimed, but another transformers model built on one (a family with its
        own tower or token layout) is not, so no family's logic runs on a model it was not written for."""
        return nearest_transformers_class(type(model)) in cls.supported

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

    def encoder(self, modality: str) -> tuple[str, str]:
        """The method of ``model.model`` that encodes a modality, and the argument its pixels go to."""
        return f"get_{modality}_features", _PIXELS[modality]

    def feature_items(self, pooler_output, arguments: dict) -> list[torch.Tensor]:
        """Each image's (video's) (n_tokens, D) tokens in an encoder's ``pooler_output``, as the model
        scatters them into its placeholders (one row or list entry each by default)."""
        return list(pooler_output)

    def frame_pool(self):
        """How the model pools a video frame's patches after the tower, as a function of (frames, side,
        side, C) maps -> (frames, tokens, C); None when it does not pool them."""
        return None

    def pooling_site(self) -> tuple[torch.nn.Module, str] | None:
        """The module and method that pool a video's frames inside ``get_video_features``, which a
        tower-stage pruner's tokens replace (``vtprune.core.video_frames``); None: no pooling."""
        return None

    def frame_side(self) -> int:
        """Patches along each side of a video frame's grid in the tower."""
        return self.config.vision_config.image_size // self.config.vision_config.patch_size

    def pooled_frame_tokens(self) -> int:
        """Tokens of one frame after the model's pooling."""
        side = self.frame_side()
        return self.frame_pool()(torch.zeros(1, side, side, 1)).shape[1]

    def decoder_access(self) -> DecoderAccess:
        """How the LLM stage reaches a decoder layer's queries, keys and sub-layers (Llama-shaped by
        default: Llama, Mistral, Qwen2, ...); a family with another decoder overrides this."""
        return LLAMA

    def feature_layers(self, n_tower: int) -> tuple[int, ...]:
        """Encoder layers (0-based) whose outputs are the selected image features."""
        return selected_layers(self.config.vision_feature_layer, n_tower)

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
            tower_name=towers.tower_name(self.tower),
            feature_layers=self.feature_layers(n_tower),
            visual_tokens=self.visual_tokens(),
        )
        self.last: PruneStats | None = None
        self._pipeline: Pipeline | None = None
        self._vision: VisionStage | None = None
        self._llm: LLMStage | None = None
        self._decode: DecodeStage | None = None
        self._generation = Generation()
        has_videos = hasattr(model.model, self.encoder("video")[0]) and getattr(self.config, "video_token_id", None)
        self.modalities = ("image", "video") if has_videos else ("image",)
        self._encoding = PerThread()  # the modality being encoded, where one method encodes several

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation or "eager"

    def check(self, config) -> None:
        pipeline = as_pipeline(config)
        if pipeline.tower is not None:
            self._check_tower(pipeline.tower)
        pipeline.check(self.info)
        impl = self.attn_implementation
        for pruner in pipeline.llm:
            if "flex" in impl:
                raise ValueError(
                    f"the {pruner.name!r} pruner does not support attn_implementation={impl!r}; "
                    "use sdpa, eager or flash"
                )
        reader = pipeline.tower_reader(self.info)
        spec = towers.tower_spec(self.tower)
        if reader is not None and spec is None:
            raise ValueError(
                f"the {reader.name!r} pruner cannot read attention from vision tower {self.info.tower_name}"
            )
        rule = pipeline.tower_score_rule()
        if rule is not None and rule.entropy_weight and (spec is None or spec.pixel_mean is None):
            raise ValueError(
                f"the {reader.name!r} pruner's entropy term reads each patch's pixels, which vtprune cannot "
                f"do in vision tower {self.info.tower_name} (its inputs are not (B, 3, H, W) images, or their "
                f"normalisation is not known from the model); use entropy=0"
            )

    def _merging_blocks(self) -> int:
        """Tower layers that may merge: those up to the last one whose output the model selects."""
        return min(self.info.feature_layers) + 1

    def _check_tower(self, pruner) -> None:
        check_tower_merging(pruner, self.tower, type(self.model).__name__, self._merging_blocks(), self.no_tower_drops)

    # -- installation ------------------------------------------------------------------------------
    def install(self, config) -> list:
        """Patch the model; returns the undo steps (bound methods, so a deep copy undoes its own)."""
        self._pipeline = pipeline = as_pipeline(config)
        self._special = self._special_ids()  # read once: a pruner reading text leaves them out of it
        self._tower_reader = towers.TowerReader(
            self.tower,
            pipeline.tower_attention_layers(self.info),
            pipeline.tower_key_layers(self.info),
            pipeline.tower_score_rule(),
        )
        self._merging = None
        self._frame_tokens = None  # a pooled frame's tokens, where a tower pruner's tokens replace the pooling
        if pipeline.tower is not None:
            spec = towers.tower_spec(self.tower)
            self._merging = TowerMerging(self.tower, spec, pipeline.tower, self._merging_blocks())
        undo = []
        try:
            if self._merging is not None:
                undo += self._merging.install()
                if "video" in self.modalities and self.pooling_site() is not None:
                    self._frame_tokens = self.pooled_frame_tokens()  # before the pooling is patched
                    owner, method = self.pooling_site()
                    undo.append(MethodPatch(owner, method, self._tokens_instead_of_pooling).undo)
            undo += [h.remove for h in self._tower_reader.install()]
            for method, modality in {self.encoder(m)[0]: m for m in reversed(self.modalities)}.items():
                encode = functools.partial(self._encoded_features, modality)
                undo.append(MethodPatch(self.model.model, method, encode).undo)
            if pipeline.vision is not None or pipeline.tower is not None:
                tower = None if pipeline.tower is None else pipeline.tower.name
                self._vision = VisionStage(pipeline.vision, self.info.num_decoder_layers, self.keeps_positions, tower)
            flash = "flash" in self.attn_implementation
            if pipeline.llm:
                self._llm = LLMStage(pipeline.llm, self.decoder_layers, self.info, self.decoder_access(), flash)
                undo += [h.remove for h in self._llm.install()]
            if pipeline.llm or pipeline.decode is not None:
                access = self.decoder_access()
                self._decode = DecodeStage(pipeline.decode, self.decoder_layers, self.info, access, flash)
                undo += [h.remove for h in self._decode.install()]
            undo.append(MethodPatch(self.model, "forward", self._patched_forward).undo)
            undo.append(MethodPatch(self.model, "generate", self._generation.generate).undo)
            undo.append(MethodPatch(self.model, "prepare_inputs_for_generation", self._generation.prepare_inputs).undo)
        except Exception:
            for u in reversed(undo):
                u()
            raise
        return undo

    def _encoded_features(self, modality: str, original, *args, **kwargs):
        """``modality``: what the patched method encodes unless ``_encode`` says otherwise (a method
        encoding several modalities is patched once, for its first)."""
        modality = self._encoding.get() or modality
        bound = inspect.signature(original).bind(*args, **kwargs)
        arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
        with (
            self._tower_reader.reading() as read,
            self._tower_runs() as runs,
            self._tower_keep_counting(modality),
            weights_loaded(self.model.model),
        ):
            out = original(*args, **kwargs)
        signals = self._signals(read, runs)
        rows = out[1] if isinstance(out, tuple) else out.pooler_output
        features = self.feature_items(rows, arguments)
        describe = self.image_parts if modality == "image" else self.video_frames
        layouts = describe(features, arguments, signals)
        for f, layout in zip(features, layouts):
            setattr(f, _LAYOUT, layout)
        if not isinstance(out, tuple):
            setattr(out, _LAYOUT, layouts)
            setattr(out, _ITEMS, features)
            setattr(out, _GROUPED, [f.shape[0] for f in features] != [r.shape[0] for r in rows])
        return out

    def _tower_runs(self):
        return self._merging.collecting() if self._merging is not None else contextlib.nullcontext([])

    def _tower_keep_counting(self, modality: str):
        """On frames pooled after the tower, a tower-stage pruner's ``keep`` counts the pooled tokens."""
        if modality != "video" or self._frame_tokens is None:
            return contextlib.nullcontext()
        return self._merging.counting_on(self._frame_tokens)

    def _tokens_instead_of_pooling(self, original, features: torch.Tensor, *args, **kwargs):
        """The model's frame pooling, or, when a tower-stage pruner reduced the frames, the tokens
        leaving the tower in the frames' slots (features: (frames, patches, D))."""
        ids = self._merging.last_token_ids()
        if ids is None:
            return original(features, *args, **kwargs)
        if features.shape[1] != ids.shape[1] - self._merging.stage.protected:
            raise NotImplementedError(
                f"{type(self.model).__name__} pools {features.shape[1]} tokens per frame, not the tower's "
                f"{ids.shape[1] - self._merging.stage.protected} patches: vtprune cannot place a tower-stage "
                f"pruner's tokens (vision_feature_select_strategy='full'?)"
            )
        return tokens_in_slots(features, ids, self._frame_tokens)

    def _signals(self, read: dict, runs: list) -> TowerSignals | None:
        if not runs:
            return TowerSignals.of(read["scores"], read["keys"])
        return self._merging.signals(read, runs, type(self.model).__name__)

    def _layouts_of(self, encoded, modality: str) -> list:
        """Each image's ``ImageParts`` (video's ``VideoFrames``) as recorded when it was encoded."""
        features = _items(encoded)
        found = [getattr(f, _LAYOUT, None) for f in features]
        if all(x is not None for x in found):
            return found
        recorded = getattr(encoded, _LAYOUT, None)
        if recorded is not None and len(recorded) == len(features):
            return recorded
        originals = getattr(encoded, _ITEMS, None)
        if modality == "image" and recorded is not None and originals is not None:
            # Repeated images (generate()'s num_return_sequences): each is one of those encoded.
            matched = [next((i for i, o in enumerate(originals) if _same(f, o)), None) for f in features]
            if None not in matched:
                return [recorded[i] for i in matched]
        if modality == "image":
            raise NotImplementedError(
                "vtprune lays out an image's tokens (grid, fixed tokens, tower signals) when it encodes the image: "
                "these image features were encoded without it (mm_encoder_outputs computed before "
                "vtprune.apply, or sliced by chunked prefill); pass pixel_values, or compute the features with "
                "model.model.get_image_features while vtprune is applied"
            )
        reader = self._pipeline.tower_reader(self.info)
        if self._pipeline.tower is not None:
            raise NotImplementedError(
                f"the {self._pipeline.tower.name!r} pruner's tokens of a video are lost when generate() repeats "
                f"the video features (num_return_sequences > 1 or beam search) on {type(self.model).__name__}; "
                f"generate one sequence per prompt, or use a vision-stage pruner"
            )
        if reader is not None:
            raise NotImplementedError(
                f"the {reader.name!r} pruner scores a video with what it reads in the tower, which is lost when "
                f"generate() repeats the video features (num_return_sequences > 1 or beam search) on "
                f"{type(self.model).__name__}; generate one sequence per prompt, or use another pruner"
            )
        # The features were repeated after encoding: their layout follows from their shape.
        return self.video_frames(features, {}, None)

    def _patched_forward(self, original, *args, **kwargs):
        a = dict(inspect.signature(original).bind(*args, **kwargs).arguments)
        a.update(a.pop("kwargs", {}))
        return self._forward(original, a)

    # -- the forward -------------------------------------------------------------------------------
    def _forward(self, original, a: dict):
        cache = a.get("past_key_values")
        if self._decode is not None and is_static(cache):
            name = self._llm.pruners[0].name if self._llm is not None else self._pipeline.decode.name
            raise ValueError(
                f"the {name!r} pruner removes tokens from the decoder's layers, so its pruned layers hold "
                f"fewer tokens than a static cache's fixed slots: cache_implementation='static' (or a "
                f"{type(cache).__name__}) is not supported with it; use the default dynamic cache, or a "
                f"vision-stage pruner ({', '.join(_vision_pruner_names())})"
            )
        self._check_cache_for_policy(cache)
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
                "later turn); to continue a pruned generate() with more text, pass its past_key_values and the "
                "full token ids without pixel_values"
            )
        generating = self._generation.current()
        if generating is not None and generating.prompt_length > input_ids.shape[1]:
            raise NotImplementedError(
                f"vtprune prunes a prompt's images in one forward, and this generate() splits its "
                f"{generating.prompt_length}-token prompt into chunks: chunked prefill (prefill_chunk_size) is not "
                f"supported with images; pass prefill_chunk_size=None"
            )
        # The model refuses raw pixels of one modality next to encoded features of another: encode all.
        encoded = {m: given.get(m) if given.get(m) is not None else self._encode(a, m, _PIXELS[m]) for m in present}
        visuals = self._visuals(encoded)
        layout = self._layout(input_ids, [(v.modality, v.parts) for v in visuals])
        # Tokens after the last prompt token (assisted decoding's candidates, use_cache=False's tokens).
        tail = None if generating is None or self._llm is None else input_ids.shape[1] - generating.prompt_length
        if self._vision is None:
            parts = [visuals[i].parts for items in layout.items for i in items]
            out, stats, slots = self._llm_forward(original, a, layout, parts, tail)
            layers = len(self.decoder_layers)
            self.last = stats if stats is not None else PruneStats.all_kept(layout.visual_counts(), layers)
            self._remember_cache(out, layout, slots)
            return out
        return self._vision_forward(original, a, encoded, visuals, layout, tail)

    def _check_cache_for_policy(self, cache) -> None:
        """A cache policy edits the tensors of plain dynamic cache layers, kept on their device."""
        policy = self._pipeline.decode
        if policy is None or cache is None:
            return
        layers = getattr(cache, "layers", [])
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
        if odd or getattr(cache, "offloading", False):
            what = f"{', '.join(odd)} layers" if odd else "offloaded layers"
            raise ValueError(
                f"the {policy.name!r} cache policy removes entries from the KV cache's layers between decoding "
                f"steps, which it does for a DynamicCache's plain layers only; this {type(cache).__name__} has "
                f"{what}: use the default DynamicCache"
            )

    def _visuals(self, encoded: dict) -> list[Visual]:
        """What the stages prune as one image each, images first, then videos (per frame or whole)."""
        budget = self._pipeline.budget
        return [
            visual
            for modality, output in encoded.items()
            for visual in visuals_of(modality, _items(output), self._layouts_of(output, modality), budget)
        ]

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
        method, argument = self.encoder(modality)
        encode = getattr(self.model.model, method)
        # What the model's own forward passes on (image_sizes, batch_num_images, video_grid_thw, ...):
        # every argument of this forward that the encoder names.
        named = {n: a[n] for n in inspect.signature(encode).parameters if n in a and n not in (pixels, argument)}
        with self._encoding.set(modality):
            encoded = encode(**{argument: a[pixels]}, **named, return_dict=True)
        a[pixels] = None
        a["mm_encoder_outputs"] = {**(a.get("mm_encoder_outputs") or {}), modality: encoded}
        return encoded

    def _llm_forward(self, original, a: dict, layout: VisualLayout, parts: list, tail: int | None) -> tuple:
        """Run the forward with the LLM stage's drops (``parts``: each image's ``ImageParts`` in layout
        order); returns the output, the stage's stats and its compaction per decoder layer (None
        without an LLM stage or before its first drop)."""
        if self._llm is None:
            return original(**a), None, None
        grids = [p.grid for p in parts]
        tower = [None if p.cls_attention is None else p.cls_attention[p.prunable] for p in parts]
        mask = a.get("attention_mask")
        generating = self._generation.current()
        score_row = None if tail is None else a["input_ids"].shape[1] - 1 - tail
        reuse = generating.kept if generating is not None else None
        restore = _requested(a, self.config, "output_hidden_states") or _requested(a, self.config, "output_attentions")
        key_mask = None if mask is None or mask.dim() != 2 else mask.bool()
        with self._llm.call(
            layout, key_mask, grids=grids, tower=tower, score_row=score_row, reuse=reuse, restore_outputs=restore
        ) as call:
            out = original(**a)
        if generating is not None:
            generating.kept = (call.choices, call.recycled)
        return out, call.stats, call.layer_compactions

    def _remember_cache(self, out, layout: VisualLayout, slots: list | None) -> None:
        """What the prefill left in the decoder's KV cache, for the decode stage."""
        if self._decode is not None:
            self._decode.prefill(getattr(out, "past_key_values", None), layout, slots, self.last)

    def _forward_without_images(self, original, a: dict):
        self._generation.map_decode_step(a)
        if self._decode is not None:
            restore = _requested(a, self.config, "output_attentions")
            with self._decode.call(restore_outputs=restore):
                return original(**a)
        return original(**a)

    def _vision_forward(self, original, a: dict, encoded: dict, visuals: list, layout: VisualLayout, tail):
        generating = self._generation.current()
        prompt = Prompt(
            input_ids=a["input_ids"],
            attention_mask=a.get("attention_mask"),
            pad_token_id=self._pad_token_id(),
            labels=a.get("labels"),
            position_ids=a.get("position_ids"),
            kept_positions=(lambda: self.original_positions(a)) if self.keeps_positions else None,
            aligned={name: _aligned(a[name], a["input_ids"]) for name in self.token_aligned if a.get(name) is not None},
            embed=self.model.get_input_embeddings(),
            special_ids=self._special,
            text_end=generating.prompt_length if generating is not None else None,
        )
        outcome = self._vision.run(visuals, layout, prompt)
        self.last = outcome.stats
        if outcome.prompt is not None:
            if outcome.full_positions is not None:
                self.shortened(outcome.compaction, outcome.full_positions, a.get("attention_mask"))
            a.update({k: v for k, v in outcome.prompt.items() if k != "labels" or "labels" in a})
            a["mm_encoder_outputs"] = {**a["mm_encoder_outputs"], **_encoder_outputs(encoded, outcome.tokens)}
        remaining = self._layout(a["input_ids"], outcome.remaining) if self._decode is not None else None
        parts = [outcome.remaining[i][1] for items in remaining.items for i in items] if remaining else []
        out, stats, slots = self._llm_forward(original, a, remaining, parts, tail)
        if stats is not None:
            self.last = outcome.stats.followed_by(stats)
        self._remember_cache(out, remaining, slots)
        cache = getattr(out, "past_key_values", None)
        if cache is not None and outcome.translation is not None:
            self._generation.decode[cache] = outcome.translation
        return out

    def _special_ids(self) -> frozenset:
        """The token ids the model's configs name (``*_token_id``, ``*_token_index``: image, video,
        vision start/end, BOS, EOS, padding, ...): never counted as an image's paired text."""
        ids = set()
        for cfg in (self.config, getattr(self.config, "text_config", None)):
            for key, value in (cfg.to_dict() if cfg is not None else {}).items():
                if not key.endswith(("_token_id", "_token_index")):
                    continue
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        return frozenset(ids)

    def _pad_token_id(self) -> int:
        for cfg in (self.config, self.config.text_config):
            pad = getattr(cfg, "pad_token_id", None)
            if pad is not None and pad != self.config.image_token_id:
                return int(pad)
        return 0 if self.config.image_token_id != 0 else 1


def _vision_pruner_names() -> list[str]:
    return [name for name in available() if pruner_class(name).stage == "vision"]


def _items(encoded) -> list[torch.Tensor]:
    """Each image's (video's) tokens in an encoder output: its rows, or, where the family grouped them
    otherwise when they were encoded (``Adapter.feature_items``: PerceptionLM's crops, all alike in
    size), groups of that size, also after generate() repeated them."""
    originals = getattr(encoded, _ITEMS, None)
    rows = list(encoded.pooler_output)
    if not getattr(encoded, _GROUPED, False) or [r.shape[0] for r in rows] == [o.shape[0] for o in originals]:
        return rows
    sizes = {o.shape[0] for o in originals}
    flat = torch.cat(rows)
    if len(sizes) == 1 and flat.shape[0] % (size := sizes.pop()) == 0:
        return list(flat.split(size))
    return rows


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b))


def _aligned(values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """A per-token input (B, L0) as long as ``input_ids`` (B, L): ``generate()`` does not extend such
    inputs over assisted decoding's candidate tokens, which follow the prompt as text (0)."""
    missing = input_ids.shape[1] - values.shape[1]
    return torch.nn.functional.pad(values, (0, missing)) if missing > 0 else values


def _encoder_outputs(encoded: dict, tokens: dict) -> dict:
    """The vision stage's tokens as the encoder outputs the model takes: one (n_i, D) tensor per image
    (video), or, where the encoder gave one (videos, tokens, D) tensor, a (1, total, D) tensor (the
    models flatten it)."""
    out = {}
    for modality, pooler in tokens.items():
        if isinstance(encoded[modality].pooler_output, torch.Tensor):
            pooler = torch.cat(pooler)[None]
        out[modality] = BaseModelOutputWithPooling(pooler_output=pooler)
    return out
