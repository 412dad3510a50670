"""``python -m vtprune demo``: every pruner on a LLaVA, what it kept, what it answered, prefill time.

By default the demo runs the real-weights proxy (``vtprune.proxy``: DINOv2-S/14 + SmolLM2-135M, built
on first use and cached) when its packages are installed: it answers a question about a real photo
unpruned and under every pruner and writes an overlay PNG of the kept patches. Without those packages,
or with ``--tiny``, it runs a tiny random-weight LLaVA instead (token counts and timings only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import vtprune
from vtprune.testing import batch_inputs, make_prompt, tiny_llava
from vtprune.timing import median_seconds

PHOTOS = ("astronaut", "cat")


def tiny_demo(keep: int) -> None:
    model = tiny_llava(hidden=256, layers=4, heads=4, kv_heads=4, vision_hidden=64)
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])])
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"tiny random LLaVA: {n_visual} visual tokens per image, prompt of {inputs['input_ids'].shape[1]} tokens")
    print(f"{'pruner':<10} {'kept':>6} {'tokens per decoder layer':<28} {'prefill ms':>10}")
    base = median_seconds(lambda: model(**inputs), repeats=3)
    print(f"{'(none)':<10} {n_visual:>6} {'':<28} {base * 1e3:>10.1f}")
    for name in vtprune.available():
        with vtprune.apply(model, name, keep=keep) as handle:
            seconds = median_seconds(lambda: model(**inputs), repeats=3)
            per_layer = ",".join(str(t) for t in handle.last.layer_tokens[0])
            print(f"{name:<10} {handle.last.kept_counts[0]:>6} {per_layer:<28} {seconds * 1e3:>10.1f}")


def proxy_demo(keep: int, image_arg: str, question: str, out: Path, max_new_tokens: int = 8) -> None:
    from PIL import Image

    from vtprune.proxy import data, default_cache_dir, load_proxy
    from vtprune.proxy import prompt as fmt
    from vtprune.proxy.overlay import kept_panel, model_view, panel_grid, patch_grid

    print(f"real-weights proxy LLaVA (cache: {default_cache_dir()}; the first run builds it in about a minute)")
    model, processor = load_proxy()
    if image_arg in PHOTOS:
        image = data.load_photo(image_arg)
    else:
        with Image.open(image_arg) as opened:
            image = opened.convert("RGB")
    inputs = processor(images=[image], text=[fmt.prompt(question)], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    grid = patch_grid(processor)
    view = model_view(processor, image)

    def run():
        with torch.no_grad():
            seconds = median_seconds(lambda: model(**inputs, logits_to_keep=1), repeats=3)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True).strip()
        return answer, seconds

    print(f"image: {image_arg} ({image.width}x{image.height}), question: {question!r}")
    print(f"{'pruner':<10} {'kept':>8} {'prefill ms':>10}  answer")
    answer, seconds = run()
    print(f"{'(none)':<10} {f'{grid * grid}':>8} {seconds * 1e3:>10.1f}  {answer}")
    panels = [("input", view)]
    for name in vtprune.available():
        with vtprune.apply(model, name, keep=keep) as handle:
            answer, seconds = run()
            kept = handle.last.kept[0]
        print(f"{name:<10} {kept.numel():>8} {seconds * 1e3:>10.1f}  {answer}")
        panels.append(kept_panel(name, view, kept, grid))
    out.parent.mkdir(parents=True, exist_ok=True)
    panel_grid([panels]).save(out)
    print(f"overlay of the kept patches: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run every pruner on a LLaVA (the real-weights proxy when installed)")
    d.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (default 64)")
    d.add_argument("--tiny", action="store_true", help="use a tiny random-weight LLaVA even if the proxy is available")
    d.add_argument("--image", default="astronaut", help=f"proxy demo: {' or '.join(PHOTOS)} (scikit-image) or a file")
    d.add_argument("--question", default="What shape is in the image?", help="proxy demo: the question asked")
    d.add_argument("--out", type=Path, default=Path("vtprune-demo.png"), help="proxy demo: overlay PNG to write")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    if args.keep < 1:
        parser.error(f"--keep must be >= 1, got {args.keep}")
    if args.image not in PHOTOS and not Path(args.image).is_file():
        parser.error(f"--image must be {' or '.join(PHOTOS)} or an existing image file, got {args.image!r}")
    if not args.question.strip():
        parser.error("--question must not be empty")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must be a .png file, got {args.out}")
    torch.manual_seed(0)
    from vtprune import proxy

    if args.tiny or not proxy.available():
        if not args.tiny:
            print(f"(the real-weights proxy needs: {', '.join(proxy.missing())}; showing a tiny random LLaVA)")
        tiny_demo(args.keep)
    else:
        proxy_demo(args.keep, args.image, args.question, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
