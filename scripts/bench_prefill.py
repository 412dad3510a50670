"""Prefill time of every pruner against the unpruned model and against the ideal.

The ideal is what pruning cannot beat: for vision-stage pruners, the vision tower plus the language
model fed the already-shortened prompt directly; for LLM-stage pruners, the tower plus the decoder
layers, each on the tokens the schedule leaves it (all before the first drop point, fewer after each),
with no scoring. Both are timed from the same kept indices the pruner chose, so the ratio pruned / ideal
is the cost of scoring and of vtprune's plumbing. "decoder FLOPs" is the theoretical prefill cost of
the decoder layers from ``handle.last.layer_tokens`` (FastV's count), as a share of the unpruned one;
multi-drop pruners read ``keep`` as the mean number of visual tokens per layer.

    python scripts/bench_prefill.py                 # LLaVA-shaped CPU model, keep 64/128/192
    python scripts/bench_prefill.py --repeats 3 --keeps 64

Model (random weights): CLIP-like tower (336 px, patch 14 -> 576 patches), Llama decoder with hidden
1024, 8 layers, 16 heads, vocabulary 32,000; fp32. Prefill = one forward computing the last token's
logits (``logits_to_keep=1``, as ``generate()`` does).
"""

from __future__ import annotations

import argparse
import platform

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, LLAVA_SHAPED_LLM, batch_inputs, make_prompt, surviving_positions, tiny_llava
from vtprune.timing import median_seconds, paired_median_seconds


def build_model(args):
    return tiny_llava(
        vision_hidden=args.vision_hidden, vision_layers=args.vision_layers, vision_heads=8, **LLAVA_SHAPED_LLM
    )


def unwrapped(model):
    """The class-level forward and image encoder, which bypass vtprune's instance patches, so the
    ideal can be timed alternately with the pruned model while the pruner stays applied."""
    forward = type(model).forward.__get__(model)
    encode = type(model.model).get_image_features.__get__(model.model)
    return forward, encode


def ideal_vision(model, inputs, kept):
    """Tower + projector, then the LLM on the prompt holding only the kept image tokens."""
    forward, encode = unwrapped(model)
    ids = inputs["input_ids"][0]
    short_ids = ids[surviving_positions(ids, kept)][None]

    def run():
        features = encode(pixel_values=inputs["pixel_values"]).pooler_output[0]
        encoded = BaseModelOutputWithPooling(pooler_output=[features[kept]])
        return forward(input_ids=short_ids, mm_encoder_outputs={"image": encoded}, logits_to_keep=1)

    return run


def ideal_llm(model, inputs, drops):
    """Tower, then the decoder layers with the visual tokens of each drop point removed from that layer
    on (``drops``: [(layer, kept indices)] as in ``PruneStats.drops``), original positions, no scoring.
    (vtprune's decoder hooks stay registered but are inert outside a pruned forward.)"""
    _, encode = unwrapped(model)
    lm = model.model.language_model
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1])
    # Per drop point: which of the tokens still present after the previous one stay.
    keeps, present = {}, torch.ones(ids.shape[1], dtype=torch.bool)
    for layer, kept in drops:
        keep = surviving_positions(ids[0], kept[0])
        keeps[layer] = keep[present]
        present = keep

    def run():
        features = encode(pixel_values=inputs["pixel_values"]).pooler_output[0]
        h = model.get_input_embeddings()(ids)
        h = h.masked_scatter((ids == IMAGE_TOKEN_ID)[..., None], features)
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
    parser.add_argument("--keeps", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--fastv-layer", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args)
    inputs = batch_inputs(model, [make_prompt(model, [1] + list(range(40, 74)), list(range(100, 140)))])
    length = inputs["input_ids"].shape[1]

    def timed(fn):
        return median_seconds(fn, repeats=args.repeats)

    def prefill():
        return model(**inputs, logits_to_keep=1)

    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(
        f"model: tower {args.vision_layers}x{args.vision_hidden}, Llama 8x1024, prompt {length} tokens (576 visual)\n"
    )
    base = timed(prefill)
    print(f"unpruned prefill: {base * 1e3:.0f} ms\n")
    text = length - 576
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
    for name in vtprune.available():
        options = {"layer": args.fastv_layer} if name == "fastv" else {}
        for keep in args.keeps:
            with vtprune.apply(model, name, keep=keep, **options) as handle:
                with torch.no_grad():
                    prefill()
                stats = handle.last
                if stats.drops:
                    ideal_fn = ideal_llm(model, inputs, stats.drops)
                else:
                    ideal_fn = ideal_vision(model, inputs, stats.kept[0])
                # Interleaved runs, so drift in machine speed hits both sides alike.
                pruned, ideal = paired_median_seconds(prefill, ideal_fn, repeats=args.repeats)
            per_layer = stats.layer_tokens[0]
            mean = sum(per_layer) / len(per_layer)
            flops = decoder_flops([text + t for t in per_layer], hidden, intermediate) / full_flops
            print(
                f"| {name} | {keep} | {mean:.1f} | {100 * flops:.0f}% | {pruned * 1e3:.0f} | {ideal * 1e3:.0f} | "
                f"{pruned / ideal:.2f}x | {base / pruned:.2f}x |"
            )


if __name__ == "__main__":
    main()
