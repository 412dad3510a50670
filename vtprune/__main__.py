"""``python -m vtprune demo``: every pruner on a LLaVA, what it kept, what it answered, prefill time.

By default the demo runs the real-weights proxy (``vtprune.proxy``: DINOv2-S/14 + SmolLM2-135M, built
on first use and cached) when its packages are installed: it asks a question about an easy-vqa test
image (the data the proxy was trained on), unpruned and under every pruner, prints the true answer and
each answer, and writes an overlay PNG of the kept patches with the question and answers. Without those packages,
or with ``--tiny``, it runs a tiny random-weight LLaVA instead (token counts and timings only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from pathlib import Path

import torch

import vtprune
from vtprune.cli_parser import OneLineParser
from vtprune.pruners.base import keep_from_text
from vtprune.testing import batch_inputs, make_prompt, tiny_llava
from vtprune.timing import Spread, paired_seconds, runs_phrase, speedup

PHOTOS = ("astronaut", "cat")
TINY_VISUAL_TOKENS = 576  # the tiny demo model's 336 px images in 14 px patches
N_TEST_IMAGES = 1000  # easy-vqa's test split


def _per_layer(stats) -> str:
    """Visual tokens per decoder layer: one number when constant, else the mean and the first/last."""
    counts = stats.layer_tokens[0]
    if len(set(counts)) == 1:
        return str(counts[0])
    return f"{sum(counts) / len(counts):.1f} ({counts[0]}..{counts[-1]})"


def timed_pair(model, name: str, keep, forward, repeats: int):
    """Wall times of ``forward()`` unpruned and under ``name``, run alternately after a warm-up, and
    the pruned forward's stats. Applying and removing the pruner is part of the pruned run."""
    state = {}

    def pruned():
        with vtprune.apply(model, name, keep=keep) as handle:
            forward()
        state["stats"] = handle.last

    unpruned, seconds = paired_seconds(forward, pruned, repeats=repeats)
    return unpruned, seconds, state["stats"]


TIMING_NOTE = (
    "prefill times: {runs}, unpruned and pruned alternately, after a warm-up; "
    "speed-up: the median of the paired ratios and (in parentheses) their interquartile range"
)
TIME_COLUMNS = f"{'unpruned ms':>11} {'prefill ms':>10} {'speed-up (IQR)':>20}"
NAME = 14  # width of the pruner column: the longest registry name


def refusal(model, name: str, keep, forward) -> str | None:
    """Why ``name`` at ``keep`` is refused on ``model`` (e.g. a keep below what the pruner's rule can
    reach; some towers know their grid only when ``forward()`` runs), or None."""
    try:
        with vtprune.apply(model, name, keep=keep), torch.no_grad():
            forward()
    except ValueError as error:
        return str(error)
    return None


def _times(unpruned: list[float], pruned: list[float]) -> tuple[str, Spread]:
    """The timing columns of a row, and the speed-up they show."""
    ratio = speedup(unpruned, pruned)
    shown = f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})"
    return f"{statistics.median(unpruned) * 1e3:>11.1f} {statistics.median(pruned) * 1e3:>10.1f} {shown:>20}", ratio


def pruned_nothing(stats, n_visual: int) -> bool:
    """Whether every decoder layer of the first sample saw all ``n_visual`` visual tokens."""
    return all(count == n_visual for count in stats.layer_tokens[0])


def noise_warning(noisy: list[str]) -> str | None:
    """The line printed when pruners that pruned nothing still show a speed-up outside their noise."""
    if not noisy:
        return None
    return (
        f"warning: {', '.join(noisy)} pruned nothing at this keep, yet the interquartile range of the speed-up "
        "excludes 1.00x: this machine's timings are noisier than the repeats show; raise --repeats"
    )


def tiny_demo(keep, repeats: int) -> None:
    model = tiny_llava(hidden=256, layers=4, heads=4, kv_heads=4, vision_hidden=64)
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])])
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"tiny random LLaVA: {n_visual} visual tokens per image, prompt of {inputs['input_ids'].shape[1]} tokens")
    print(TIMING_NOTE.format(runs=runs_phrase(repeats)))
    print(f"{'pruner':<{NAME}} {'kept':>6} {'per decoder layer':<20} {TIME_COLUMNS}")
    noisy = []
    for name in vtprune.available():
        if why := refusal(model, name, keep, lambda: model(**inputs)):
            print(f"{name:<{NAME}} refused: {why}")
            continue
        unpruned, seconds, stats = timed_pair(model, name, keep, lambda: model(**inputs), repeats)
        columns, ratio = _times(unpruned, seconds)
        print(f"{name:<{NAME}} {stats.token_counts[0]:>6} {_per_layer(stats):<20} {columns}")
        if pruned_nothing(stats, n_visual) and not ratio.contains(1.0):
            noisy.append(name)
    if warning := noise_warning(noisy):
        print(warning)


EASY_VQA = "easy-vqa:"
DEFAULT_IMAGE = EASY_VQA + "0"
DEFAULT_QUESTIONS = {"easy-vqa": "what is the color of the shape?", "photo": "What shape is in the image?"}
PANEL_TEXT = 20  # characters of an answer that fit under a 224 px panel beside "(wrong)"
LEGEND = (
    "Coloured patches: the visual tokens kept (for LLM-stage pruners, those that reach the last decoder layer); "
    "grey: dropped."
)


def _easy_vqa_id(image_arg: str) -> int | None:
    """The test image id of ``easy-vqa:N``, None for any other ``--image``."""
    if not image_arg.startswith(EASY_VQA):
        return None
    text = image_arg[len(EASY_VQA) :]
    return int(text) if text.isdigit() else -1


def true_answer(image_id: int | None, question: str) -> str | None:
    """easy-vqa's answer to ``question`` about test image ``image_id``, if the data set asks it."""
    if image_id is None:
        return None
    from vtprune.proxy import data

    wanted = question.strip().rstrip("?").strip().lower()
    return next(
        (q.answer for q in data.by_image(data.questions("test")).get(image_id, ()) if q.text.rstrip("?") == wanted),
        None,
    )


def _verdict(reply: str, truth: str | None, width: int | None = None) -> str:
    """``reply`` (shortened to ``width`` characters) and, when the true answer is known, right or wrong."""
    words = reply.lower().split()
    shown = textwrap.shorten(reply, width, placeholder="...") if width else reply
    if truth is None:
        return shown
    return f"{shown} ({'right' if words and words[0].strip('.,!') == truth else 'wrong'})"


def proxy_demo(keep, image_arg: str, question: str, out: Path, repeats: int, max_new_tokens: int = 8) -> None:
    from PIL import Image

    from vtprune.proxy import data, default_cache_dir, load_proxy
    from vtprune.proxy import prompt as fmt
    from vtprune.proxy.overlay import kept_panel, model_view, panel_grid, patch_grid

    print(f"real-weights proxy LLaVA (cache: {default_cache_dir()})")
    if not any(default_cache_dir().glob("*/.done")) and not any(default_cache_dir().glob("*/*.safetensors")):
        print("building it from the installed packages (the first run only; about a minute)")
    model, processor = load_proxy()
    image_id = _easy_vqa_id(image_arg)
    if image_id is not None:
        image = data.load_image("test", image_id)
    elif image_arg in PHOTOS:
        image = data.load_photo(image_arg)
    else:
        with Image.open(image_arg) as opened:
            image = opened.convert("RGB")
    truth = true_answer(image_id, question)
    inputs = processor(images=[image], text=[fmt.prompt(question)], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    grid = patch_grid(processor)
    view = model_view(processor, image)

    def answer() -> str:
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True).strip()

    def prefill():
        return model(**inputs, logits_to_keep=1)

    print(f"image: {image_arg} ({image.width}x{image.height}), question: {question!r}")
    if image_id is None:
        print(
            "note: the proxy was trained on easy-vqa only (one coloured shape per image), to answer with one "
            f"of its 13 words ({', '.join(data.answers())}); about other images its answers are not meaningful"
        )
    if truth is not None:
        print(f"true answer: {truth}")
    elif image_id is not None:
        print(f"true answer: unknown (easy-vqa does not ask this question about test image {image_id})")
    print(TIMING_NOTE.format(runs=runs_phrase(repeats)))
    print(f"{'pruner':<{NAME}} {'kept':>8} {'per decoder layer':<20} {TIME_COLUMNS}  answer")
    reply = answer()
    blank = " " * len(TIME_COLUMNS)
    print(f"{'(none)':<{NAME}} {f'{grid * grid}':>8} {'':<20} {blank}  {_verdict(reply, truth)}")
    noisy = []
    panels = [(f"input, {grid * grid} tokens\n-> {_verdict(reply, truth, PANEL_TEXT)}", view)]
    for name in vtprune.available():
        if why := refusal(model, name, keep, prefill):
            print(f"{name:<{NAME}} refused: {why}")
            continue
        unpruned, seconds, stats = timed_pair(model, name, keep, prefill, repeats)
        with vtprune.apply(model, name, keep=keep):
            reply = answer()
        kept = stats.kept[0]
        columns, ratio = _times(unpruned, seconds)
        print(f"{name:<{NAME}} {stats.token_counts[0]:>8} {_per_layer(stats):<20} {columns}  {_verdict(reply, truth)}")
        if pruned_nothing(stats, grid * grid) and not ratio.contains(1.0):
            noisy.append(name)
        title, panel = kept_panel(name, view, kept, grid, merged=len(stats.merged[0]) if stats.merged else 0)
        panels.append((f"{title}\n-> {_verdict(reply, truth, PANEL_TEXT)}", panel))
    if warning := noise_warning(noisy):
        print(warning)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"Q: {question}" + (f"   true answer: {truth}" if truth is not None else ""),
        f"keep={keep} visual tokens per image of {grid * grid} (multi-drop pruners: the mean per decoder layer)",
    )
    panel_grid([panels], header=header, footer=(LEGEND,)).save(out)
    print(f"overlay of the kept patches: {out}")


def _parse_keep(text: str):
    """``--keep``: an int (tokens per image) or a float in (0, 1] (a fraction), as ``vtprune.apply`` takes."""
    try:
        return keep_from_text(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


PROXY_ONLY = ("image", "question", "out")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["profile"]:
        from vtprune.profiling.cli import main as profile

        return profile(argv[1:])
    if argv[:1] == ["eval"]:
        from vtprune.evaluation.cli import main as evaluate

        return evaluate(argv[1:])
    if argv[:1] == ["checkpoint"]:
        from vtprune.checkpoint_cli import main as checkpoint

        return checkpoint(argv[1:])
    if argv[:1] == ["calibrate"]:
        from vtprune.calibration import main as calibrate

        return calibrate(argv[1:])
    parser = OneLineParser(
        prog="vtprune",
        description="Visual-token pruning for LLaVA models. 'vtprune demo' runs every pruner on a LLaVA; "
        "'vtprune profile' measures latency, memory and FLOPs (see 'vtprune profile --help'); 'vtprune eval' runs "
        "lmms-eval with vtprune's model and an exit status that says whether it worked; 'vtprune checkpoint' "
        "writes a local checkpoint (no download); 'vtprune calibrate' chooses VFlowOpt's settings.",
    )
    parser.add_argument("--version", action="version", version=f"vtprune {vtprune.__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("profile", help="latency, memory and FLOPs vs kept tokens (vtprune profile --help)", add_help=False)
    sub.add_parser("eval", help="lmms-eval with vtprune's model; exits non-zero when the run fails", add_help=False)
    sub.add_parser("checkpoint", help="write a local llava-hf checkpoint: proxy or tiny (no download)", add_help=False)
    sub.add_parser("calibrate", help="choose VFlowOpt's settings for a model and a budget", add_help=False)
    d = sub.add_parser(
        "demo",
        help="run every pruner on a LLaVA (the real-weights proxy when installed)",
        description=(
            "Run every pruner on a LLaVA: the real-weights proxy (DINOv2-S/14 + SmolLM2-135M, 256 visual "
            "tokens) when its packages are installed, answering a question about an image, else a tiny "
            "random LLaVA (576 visual tokens; token counts and timings only)."
        ),
    )
    d.add_argument(
        "--keep",
        type=_parse_keep,
        default=64,
        help="visual tokens kept per image: an int (of 256 on the proxy, 576 on the tiny model) or a fraction "
        "in (0, 1]; for multi-drop pruners the mean per decoder layer (default 64)",
    )
    d.add_argument("--repeats", type=int, default=5, help="timed prefills per side (default 5)")
    d.add_argument("--tiny", action="store_true", help="use a tiny random-weight LLaVA even if the proxy is available")
    d.add_argument(
        "--image",
        default=None,
        help=f"proxy: easy-vqa:N (test image N, default {DEFAULT_IMAGE}), {' or '.join(PHOTOS)} (scikit-image "
        "photos) or an image file; the proxy only answers meaningfully about easy-vqa images",
    )
    d.add_argument(
        "--question",
        default=None,
        help=f"proxy: the question asked (default: {DEFAULT_QUESTIONS['easy-vqa']!r} for easy-vqa images, "
        f"{DEFAULT_QUESTIONS['photo']!r} otherwise)",
    )
    d.add_argument("--out", type=Path, default=None, help="proxy: overlay PNG to write (default vtprune-demo.png)")
    args = parser.parse_args(argv)
    if args.command is None:  # bare `vtprune`: say what there is rather than start the minutes-long demo
        parser.print_help()
        return 0
    from vtprune import proxy

    tiny = args.tiny or not proxy.available()
    given = [f"--{name}" for name in PROXY_ONLY if getattr(args, name) is not None]
    if args.tiny and given:
        d.error(f"{', '.join(given)} only apply to the proxy demo, not with --tiny")
    if args.repeats < 1:
        d.error(f"--repeats must be >= 1, got {args.repeats}")
    if isinstance(args.keep, int):
        from vtprune.proxy.assemble import TOKENS_PER_IMAGE

        n_visual, model_name = (TINY_VISUAL_TOKENS, "tiny model") if tiny else (TOKENS_PER_IMAGE, "proxy")
        if args.keep > n_visual:
            d.error(f"--keep {args.keep}: more than the {n_visual} visual tokens of the {model_name}'s image")
    image = args.image if args.image is not None else DEFAULT_IMAGE
    image_id = _easy_vqa_id(image)
    question = args.question
    if question is None:
        question = DEFAULT_QUESTIONS["easy-vqa" if image_id is not None else "photo"]
    out = args.out if args.out is not None else Path("vtprune-demo.png")
    if image_id is not None:
        if not 0 <= image_id < N_TEST_IMAGES:
            d.error(f"--image {image!r}: easy-vqa test images are easy-vqa:0 to easy-vqa:{N_TEST_IMAGES - 1}")
    elif image not in PHOTOS and not Path(image).is_file():
        d.error(f"--image must be easy-vqa:N, {' or '.join(PHOTOS)} or an existing image file, got {image!r}")
    elif image not in PHOTOS:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError) as error:
            d.error(f"--image {image!r} is not an image file PIL can read ({error})")
    if not question.strip():
        d.error("--question must not be empty")
    if out.suffix.lower() != ".png":
        d.error(f"--out must be a .png file, got {out}")
    torch.manual_seed(0)
    if tiny:
        if not args.tiny:
            print(f"(the real-weights proxy needs: {', '.join(proxy.missing())}; showing a tiny random LLaVA)")
        tiny_demo(args.keep, args.repeats)
    else:
        proxy_demo(args.keep, image, question, out, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
