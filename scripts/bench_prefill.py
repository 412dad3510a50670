"""Prefill time of every pruner against the unpruned model and against the ideal.

The ideal is what pruning cannot beat: for vision-stage pruners, the vision tower plus the language
model fed the already-shortened prompt directly; for LLM-stage pruners, the tower plus the decoder
layers, each on the tokens the schedule leaves it (all before the first drop point, fewer after each),
with no scoring; for tower-stage pruners (alone or first in a Pipeline), the tower as they prune it
(that is their work and their saving) plus the language model fed the shortened prompt. Both are
timed from the same kept indices the pruner chose, so the ratio pruned / ideal is the cost of scoring
and of vtprune's plumbing. "decoder FLOPs" is the theoretical prefill cost of the decoder layers from
``handle.last.layer_tokens`` (FastV's count), as a share of the unpruned one; multi-drop pruners read
``keep`` as the mean number of visual tokens per layer. The speed-up divides the unpruned prefill
timed once at the start by the pruned one; ``--paired-unpruned`` times each row against an untouched
copy of the model instead, run alternately with it (twice the time, robust to machine drift).

    python scripts/bench_prefill.py                 # LLaVA-shaped CPU model, keep 64/128/192
    python scripts/bench_prefill.py --repeats 3 --keeps 64
    python scripts/bench_prefill.py --family llava_next   # a 672x672 image: 2,880 visual tokens
    python scripts/bench_prefill.py --family llava_onevision  # a 756x756 image: 3,645 visual tokens
    python scripts/bench_prefill.py --family qwen2_vl     # a 728x1176 image: 1,092 visual tokens
    python scripts/bench_prefill.py --family llava_next_video  # 16 frames: 2,304 visual tokens
    python scripts/bench_prefill.py --family fast_vlm     # a 1024x1024 image: 256 visual tokens
    python scripts/bench_prefill.py --family perception_lm  # thumbnail + 2x2 tiles: 1,280 visual tokens
    python scripts/bench_prefill.py --pruners tome tome+divprune  # a+b: a Pipeline, a keeping twice b's keep

Model (random weights): CLIP-like tower (336 px, patch 14 -> 576 patches per tower input), Llama
decoder with hidden 1024, 8 layers, 16 heads, vocabulary 32,000; fp32. ``--family llava_next``: the
same in LLaVA-NeXT's anyres layout with LLaVA-1.6's crop shapes; a 672x672 image is a base image and
2x2 crops: 576 + 2,304 visual tokens and 48 newline tokens (never pruned). ``--family qwen2_vl``: a
Qwen2-VL tower of the same width and depth (14 px patches, merged 2x2) and the same decoder with M-RoPE;
a 728x1176 image is 52 x 84 patches, 1,092 visual tokens. Prefill = one forward
computing the last token's logits (``logits_to_keep=1``, as ``generate()`` does). ``--family
llava_onevision``: a SigLIP-like tower (378 px, 27 x 27 patches, no CLS token) in OneVision's layout; a
756x756 image is a base image and 2x2 crops: 729 + 2,916 visual tokens and 54 newline tokens.
``--family llava_next_video``: the LLaVA tower and decoder in LLaVA-NeXT-Video's layout; a video of 16
frames at 336 px, each frame's 24 x 24 patches pooled to 12 x 12: 2,304 visual tokens; ``keep`` is per
frame (``budget="per_frame"``). ``--family fast_vlm``: a FastViT-HD tower at half FastVLM's widths (48 to
768 channels, blocks 2/2/4/2/2; ``--vision-*`` do not apply) and the same decoder; a 1024x1024 image is
a 16 x 16 grid, 256 visual tokens. ``--family perception_lm``: a Perception Encoder tower (CLS, RoPE,
14 px patches) of ``--vision-hidden`` x ``--vision-layers`` on 448 px tiles, each pooled 2x2 to 16 x 16
tokens; an image is a thumbnail and 2x2 tiles: 1,280 visual tokens.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.pruners.base import keep_from_text
from vtprune.testing import (
    IMAGE_TOKEN_ID,
    LLAVA_SHAPED_LLM,
    VIDEO_TOKEN_ID,
    batch_inputs,
    image_token_counts,
    make_prompt,
    tiny_fast_vlm,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_perception_lm,
    tiny_qwen2_vl,
    video_token_counts,
)
from vtprune.timing import median_seconds, paired_median_seconds

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "llava_next_video", "fast_vlm", "perception_lm")
DEFAULT_KEEPS = {
    "llava": [64, 128, 192],
    "llava_next": [160, 320, 640],
    "llava_onevision": [196, 392, 784],
    "qwen2_vl": [128, 256, 512],
    "llava_next_video": [18, 36, 72],  # per frame, of 144
    "fast_vlm": [32, 64, 128],
    "perception_lm": [160, 320, 640],
}
VISUAL_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos")


def build(args) -> tuple:
    """The model and a one-image prompt (35 text tokens before the image, 40 after)."""
    tower = {"vision_hidden": args.vision_hidden, "vision_layers": args.vision_layers, "vision_heads": 8}
    before, after = [1] + list(range(40, 74)), list(range(100, 140))
    if args.family == "llava":
        model = tiny_llava(**tower, **LLAVA_SHAPED_LLM)
        return model, batch_inputs(model, [make_prompt(model, before, after)])
    if args.family == "llava_next_video":
        model = tiny_llava_next_video(image_size=336, **tower, **LLAVA_SHAPED_LLM)
        video = {"pixel_values_videos": torch.randn(1, 16, 3, 336, 336)}
        ids = torch.tensor([before + [VIDEO_TOKEN_ID] * video_token_counts(model, **video)[0] + after])
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **video}
    if args.family == "llava_next":
        model = tiny_llava_next(image_size=336, **tower, **LLAVA_SHAPED_LLM)
        images = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    elif args.family == "fast_vlm":
        model = tiny_fast_vlm(embed_dims=(48, 96, 192, 384, 768), blocks=(2, 2, 4, 2, 2), **LLAVA_SHAPED_LLM)
        images = {"pixel_values": torch.randn(1, 3, 1024, 1024)}
    elif args.family == "perception_lm":
        model = tiny_perception_lm(tile=448, **tower, **LLAVA_SHAPED_LLM)
        images = {"pixel_values": torch.randn(1, 5, 3, 448, 448)}
    elif args.family == "llava_onevision":
        model = tiny_llava_onevision(image_size=378, vision_aspect_ratio="anyres_max_9", **tower, **LLAVA_SHAPED_LLM)
        images = {"pixel_values": torch.randn(1, 5, 3, 378, 378), "image_sizes": torch.tensor([[756, 756]])}
    else:
        model = tiny_qwen2_vl(**tower, **LLAVA_SHAPED_LLM)
        h, w = 52, 84  # patches of a 728 x 1176 px image: 26 x 42 = 1,092 visual tokens
        images = {"pixel_values": torch.randn(h * w, 1176), "image_grid_thw": torch.tensor([[1, h, w]])}
    ids = torch.tensor([before + [IMAGE_TOKEN_ID] * image_token_counts(model, **images)[0] + after])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **images}
    if args.family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).int()
    return model, inputs


def visual_inputs(inputs) -> dict:
    return {k: inputs[k] for k in VISUAL_INPUTS if k in inputs}


def modality(inputs) -> tuple[str, int]:
    """The prompt's one visual input: ("image" or "video", its placeholder token id)."""
    return ("video", VIDEO_TOKEN_ID) if "pixel_values_videos" in inputs else ("image", IMAGE_TOKEN_ID)


def fixed_positions(model, inputs) -> torch.Tensor:
    """Positions among the image's tokens that are never pruned (LLaVA-NeXT's newline tokens)."""
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(0, dtype=torch.long)
    _, encode = unwrapped(model, modality(inputs)[0])
    with torch.no_grad():
        features = first_item(encode(**visual_inputs(inputs)).pooler_output)
    return (features == newline).all(-1).nonzero().flatten()


def first_item(pooler_output) -> torch.Tensor:
    """The prompt's one image (video) as (n_tokens, D): PerceptionLM's encoder gives one row per crop."""
    if isinstance(pooler_output, torch.Tensor) and pooler_output.dim() == 3:
        return pooler_output.flatten(0, 1)
    return pooler_output[0]


def surviving_positions(ids: torch.Tensor, kept: torch.Tensor, fixed: torch.Tensor, token_id: int) -> torch.Tensor:
    """(L,) bool: text tokens, fixed image tokens, and the prunable image tokens in ``kept``."""
    image = (ids == token_id).nonzero().flatten()
    prunable = torch.ones(image.numel(), dtype=torch.bool)
    prunable[fixed] = False
    stays = torch.ones(ids.numel(), dtype=torch.bool)
    stays[image] = False
    stays[image[fixed]] = True
    stays[image[prunable.nonzero().flatten()[kept]]] = True
    return stays


def unwrapped(model, kind: str):
    """The class-level forward and image (video) encoder, which bypass vtprune's instance patches, so
    the ideal can be timed alternately with the pruned model while the pruner stays applied."""
    forward = type(model).forward.__get__(model)
    encode = getattr(type(model.model), f"get_{kind}_features").__get__(model.model)
    return forward, encode


def ideal_vision(model, inputs, kept, fixed, groups=(), tower_pruned=False):
    """Tower + projector, then the LLM on the prompt holding only the kept (and fixed) image tokens,
    and after them one token per merged group (its mean)."""
    kind, token_id = modality(inputs)
    forward, encode = unwrapped(model, kind)
    if tower_pruned:  # the encoder as patched: the tower stage's saving is the pruner's own work
        encode = getattr(model.model, f"get_{kind}_features")
    ids = inputs["input_ids"][0]
    stays = surviving_positions(ids, kept, fixed, token_id)
    image = (ids == token_id).nonzero().flatten()
    in_image = stays[image]
    stays[image[~in_image][: len(groups)]] = True  # a placeholder for each merged token
    short_ids = ids[stays][None]
    prunable = torch.ones(image.numel(), dtype=torch.bool)
    prunable[fixed] = False
    prunable = prunable.nonzero().flatten()

    def run():
        pooler = encode(**visual_inputs(inputs)).pooler_output
        features = first_item(pooler)
        tokens = features[in_image]
        if groups:
            tokens = torch.cat([tokens, torch.stack([features[prunable[g]].mean(0) for g in groups])])
        # as the encoder gave them: one tensor (FastVLM, PerceptionLM take no list) or a list per image
        encoded = BaseModelOutputWithPooling(
            pooler_output=tokens[None] if isinstance(pooler, torch.Tensor) else [tokens]
        )
        return forward(input_ids=short_ids, mm_encoder_outputs={kind: encoded}, logits_to_keep=1)

    return run


def ideal_llm(model, inputs, drops, fixed):
    """Tower, then the decoder layers with the visual tokens of each drop point removed from that layer
    on (``drops``: [(layer, kept indices)] as in ``PruneStats.drops``), original positions, no scoring.
    (vtprune's decoder hooks stay registered but are inert outside a pruned forward.)"""
    kind, token_id = modality(inputs)
    _, encode = unwrapped(model, kind)
    lm = model.model.language_model
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1])
    # Per drop point: which of the tokens still present after the previous one stay.
    keeps, present = {}, torch.ones(ids.shape[1], dtype=torch.bool)
    for layer, kept in drops:
        keep = surviving_positions(ids[0], kept[0], fixed, token_id)
        keeps[layer] = keep[present]
        present = keep

    def run():
        features = first_item(encode(**visual_inputs(inputs)).pooler_output)
        h = model.get_input_embeddings()(ids)
        h = h.masked_scatter((ids == token_id)[..., None], features)
        cos, sin = lm.rotary_emb(h, positions[None])
        for i, decoder_layer in enumerate(lm.layers):
            if i in keeps:
                h, cos, sin = h[:, keeps[i]], cos[:, keeps[i]], sin[:, keeps[i]]
            h = decoder_layer(h, attention_mask=None, position_embeddings=(cos, sin))
        return model.lm_head(lm.norm(h[:, -1:]))

    return run


def decoder_flops(tokens_per_layer: list[int], hidden: int, intermediate: int) -> float:
    """Multiply-adds of the decoder layers' prefill, FastV's count with Llama's gated MLP: per layer
    with n tokens, 4nd^2 (q, k, v, o) + 2n^2d (scores, weighted sum) + 3ndm (gate, up, down)."""
    return sum(4 * n * hidden**2 + 2 * n**2 * hidden + 3 * n * hidden * intermediate for n in tokens_per_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument(
        "--keeps",
        type=keep_from_text,
        nargs="+",
        default=None,
        help="ints (tokens per image) or fractions in (0, 1]; default: 64 128 192 (llava), 160 320 640",
    )
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=None,
        help="names, or a+b for a Pipeline where a keeps twice b's keep; default: all",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument(
        "--paired-unpruned",
        action="store_true",
        help="time each row's speed-up against an untouched copy of the model, run alternately with it",
    )
    args = parser.parse_args()
    unknown = [part for name in args.pruners or [] for part in name.split("+") if part not in vtprune.available()]
    if unknown:
        parser.error(f"unknown pruners {unknown}; available: {', '.join(vtprune.available())}")
    torch.set_num_threads(args.threads)

    keeps = args.keeps or DEFAULT_KEEPS[args.family]
    model, inputs = build(args)
    length = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"] == modality(inputs)[1]).sum())
    fixed = fixed_positions(model, inputs)

    def timed(fn):
        return median_seconds(fn, repeats=args.repeats)

    def prefill():
        return model(**inputs, logits_to_keep=1)

    tower_text = "FastViT-HD 48-768" if args.family == "fast_vlm" else f"{args.vision_layers}x{args.vision_hidden}"
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"model: {args.family}, tower {tower_text}, decoder 8x1024, prompt {length} "
        f"tokens ({n_image - fixed.numel()} visual, {fixed.numel()} newline)\n"
    )
    base = timed(prefill)
    _, encode = unwrapped(model, modality(inputs)[0])
    with torch.no_grad():
        tower = timed(lambda: encode(**visual_inputs(inputs)))
    print(f"unpruned prefill: {base * 1e3:.0f} ms, of which the tower and projector: {tower * 1e3:.0f} ms\n")
    untouched = copy.deepcopy(model) if args.paired_unpruned else None

    def unpruned_prefill():
        return untouched(**inputs, logits_to_keep=1)

    text = length - n_image + fixed.numel()
    layers, hidden, intermediate = (
        LLAVA_SHAPED_LLM["layers"],
        LLAVA_SHAPED_LLM["hidden"],
        LLAVA_SHAPED_LLM["intermediate"],
    )
    full_flops = decoder_flops([length] * layers, hidden, intermediate)
    print(
        "| pruner | keep | visual tokens per layer (mean) | decoder FLOPs | prefill ms | ideal ms "
        "| pruned / ideal | speed-up vs unpruned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.pruners or vtprune.available():
        options = {"layer": args.fastv_layer} if name == "fastv" else {}
        for keep in keeps:
            try:
                pruner = vtprune.Pipeline.of_two(name, keep) if "+" in name else name
                handle = vtprune.apply(model, pruner, **({} if "+" in name else {"keep": keep, **options}))
                with torch.no_grad():
                    prefill()
            except ValueError as error:  # a keep the pruner's rule cannot reach, or a tower it cannot run in
                print(f"| {name} | {keep} | refused: {error} | | | | | |")
                if vtprune.handle_of(model) is not None:
                    handle.remove()
                continue
            with handle:
                stats = handle.last
                if stats.drops:
                    ideal_fn = ideal_llm(model, inputs, stats.drops, fixed)
                else:
                    tower = vtprune.registry.pruner_class(name.split("+")[0]).stage == "tower"
                    merged = stats.merged[0] if stats.merged else ()
                    ideal_fn = ideal_vision(model, inputs, stats.kept[0], fixed, merged, tower_pruned=tower)
                # Interleaved runs, so drift in machine speed hits both sides alike.
                pruned, ideal = paired_median_seconds(prefill, ideal_fn, repeats=args.repeats)
                unpruned = base
                if untouched is not None:  # the speed-up from runs alternating with the unpruned model
                    pruned_again, unpruned = paired_median_seconds(prefill, unpruned_prefill, repeats=args.repeats)
            per_layer = stats.layer_tokens[0]
            mean = sum(per_layer) / len(per_layer)
            flops = decoder_flops([text + t for t in per_layer], hidden, intermediate) / full_flops
            print(
                f"| {name} | {keep} | {mean:.1f} | {100 * flops:.0f}% | {pruned * 1e3:.0f} | {ideal * 1e3:.0f} | "
                f"{pruned / ideal:.2f}x | "
                + (
                    f"{unpruned / pruned_again:.2f}x ({unpruned * 1e3:.0f} ms unpruned) |"
                    if untouched
                    else f"{base / pruned:.2f}x |"
                )
            )


if __name__ == "__main__":
    main()
