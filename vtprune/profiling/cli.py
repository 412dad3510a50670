"""``vtprune profile``: latency, memory and FLOPs vs kept visual tokens, per pruner.

    vtprune profile --model proxy --pruners divprune fastv --keeps 16 64
    vtprune profile --model path/to/llava-1.5-7b-hf --device cuda --dtype float16 --csv out.csv --plot out.png

``--model``: ``tiny`` (a random tiny LLaVA, 576 visual tokens), ``proxy`` (the real-weights proxy,
256 visual tokens; the ``proxy`` extra), a local model directory or a Hub id (any supported family,
read from its config; offline, a Hub id fails with one line). Every row is one pruner at one keep,
plus the unpruned model; see ``vtprune.profiling.measure`` for what each column means.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

from vtprune.cli_parser import OneLineParser
from vtprune.timing import count_phrase, runs_phrase

COLUMNS = (
    ("pruner", "pruner", "{}"),
    ("keep", "keep", "{}"),
    ("kept_tokens", "kept", "{}"),
    ("mean_layer_tokens", "per layer", "{:.1f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("prefill_iqr_ms", "IQR ms", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.2f}"),
    ("peak_memory_mb", "peak MB", "{:.1f}"),
    ("kv_cache_mb", "KV MB", "{:.2f}"),
    ("end_layer_tokens", "end per layer", "{:.1f}"),
    ("kv_cache_end_mb", "end KV MB", "{:.2f}"),
    ("prefill_gflops", "prefill GFLOPs", "{:.2f}"),
)


QUESTION = "What is shown in this image?"


class ProfileError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def parse_args(argv):
    import vtprune

    p = OneLineParser(prog="vtprune profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, proxy, a model directory or a Hub id (default tiny)")
    p.add_argument("--pruners", nargs="+", default=["divprune", "fastv"], help=f"of: {', '.join(vtprune.available())}")
    p.add_argument("--keeps", nargs="+", default=["16", "64"], help="visual tokens kept per image (or fractions)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row, after the warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="copies of the prompt per batch (default 1)")
    p.add_argument("--image", type=Path, default=None, help="image file (default: a built-in one)")
    p.add_argument("--question", default=None, help=f"the prompt's question (default {QUESTION!r})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model directories and Hub ids (default auto: the checkpoint's own)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--csv", type=Path, default=None, help="write the rows here")
    p.add_argument("--plot", type=Path, default=None, help="write prefill time and FLOPs vs tokens per layer (PNG)")
    return p.parse_args(argv)


def _keep(text: str):
    from vtprune.pruners.base import keep_from_text

    try:
        return keep_from_text(text)
    except ValueError as error:
        raise ProfileError(f"--keeps: {error}") from None


def check_args(args):
    """Every argument checked before a model is built or loaded; returns the parsed keeps."""
    import vtprune

    unknown = [p for p in args.pruners if p not in vtprune.available()]
    if unknown:
        raise ProfileError(f"unknown pruner(s) {', '.join(unknown)}; available: {', '.join(vtprune.available())}")
    for name, value, low in (
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--new-tokens", args.new_tokens, 2),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise ProfileError(f"{name} must be >= {low}, got {value}")
    if args.model not in ("tiny", "proxy"):
        from vtprune.patches.loading import check_model_path

        try:
            check_model_path(args.model)  # a local-looking path must hold a model; anything else is a Hub id
        except (FileNotFoundError, ValueError) as error:
            raise ProfileError(
                f"--model {args.model!r}: not tiny, proxy, a Hub id or a model directory ({error})"
            ) from None
    if args.model == "tiny" and (args.image is not None or args.question is not None):
        raise ProfileError("--image and --question apply to --model proxy or a model directory, not --model tiny")
    if args.image is not None and not args.image.is_file():
        raise ProfileError(f"--image {args.image}: no such file")
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.image) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise ProfileError(f"--image {args.image}: not an image file PIL can read ({error})") from None
    for path, suffix in ((args.csv, ".csv"), (args.plot, ".png")):
        if path is not None and path.suffix.lower() != suffix:
            raise ProfileError(f"{path}: must end in {suffix}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ProfileError("--plot needs matplotlib (in the proxy extra: pip install -e '.[proxy]')")
    if args.device not in (None, "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ProfileError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError("--device cuda: no CUDA device here")
    keeps = [_keep(k) for k in args.keeps]
    for pruner in args.pruners:
        for keep in keeps:
            try:
                vtprune.api.make_pruner(pruner, keep=keep)
            except (TypeError, ValueError) as error:
                raise ProfileError(str(error)) from None
    return keeps


def _image(args):
    from PIL import Image

    if args.image is not None:
        return Image.open(args.image).convert("RGB")
    import random

    from vtprune.evaluation.task_data import draw_shape

    return draw_shape("circle", "red", 336, random.Random(0))


def workload(args, device):
    """(model, inputs, description) for ``--model``."""
    if args.model == "tiny":
        from vtprune.testing import batch_inputs, make_prompt, tiny_llava

        torch.manual_seed(0)
        model = tiny_llava(hidden=256, layers=4, heads=4, kv_heads=4, vision_hidden=64).to(device).eval()
        prompt = make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])
        inputs = batch_inputs(model, [prompt] * args.batch_size)
        return model, {k: v.to(device) for k, v in inputs.items()}, "tiny random LLaVA (576 visual tokens)"
    if args.model == "proxy":
        from vtprune import proxy

        if not proxy.available():
            raise ProfileError(f"--model proxy needs the proxy extra: missing {', '.join(proxy.missing())}")
        model, processor = proxy.load_proxy()
        model = model.to(device)
        description = "real-weights proxy (DINOv2-S/14 + SmolLM2-135M, 256 visual tokens)"
    else:
        from vtprune.patches.loading import load_model

        try:
            model, processor = load_model(args.model, dtype=args.dtype, device=device)
        except OSError as error:  # offline, or no such Hub id: transformers' first line says which
            raise ProfileError(f"--model {args.model!r}: cannot load it ({_first_line(error)})") from None
        description = f"{args.model} ({type(model).__name__})"
    from vtprune.evaluation.prompts import chat_prompt

    text = chat_prompt(processor, args.question or QUESTION, 1)
    image = _image(args)
    inputs = processor(
        text=[text] * args.batch_size, images=[image] * args.batch_size, return_tensors="pt", padding=True
    )
    inputs = inputs.to(device)
    for name in ("pixel_values",):
        if name in inputs and inputs[name].is_floating_point():
            inputs[name] = inputs[name].to(model.dtype)
    return model, dict(inputs), description


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(rows) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[_cell(getattr(r, name), fmt) for name, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(rows[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = next((r for r in rows if r.pruner == "none"), None)
    for pruner in dict.fromkeys(r.pruner for r in rows if r.pruner != "none"):
        mine = sorted((r for r in rows if r.pruner == pruner), key=lambda r: r.mean_layer_tokens)
        xs = [r.mean_layer_tokens for r in mine]
        axes[0].plot(xs, [r.prefill_ms for r in mine], marker="o", label=pruner)
        axes[1].plot(xs, [r.prefill_gflops for r in mine], marker="o", label=pruner)
    if base is not None:
        axes[0].axhline(base.prefill_ms, color="black", linestyle="--", label="unpruned")
        axes[1].axhline(base.prefill_gflops, color="black", linestyle="--", label="unpruned")
    for ax, label in zip(axes, ("prefill ms (median)", "LLM prefill GFLOPs")):
        ax.set_xlabel("visual tokens per decoder layer (mean over layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from tqdm import tqdm

    from vtprune.profiling.measure import measure

    keeps = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, inputs, description = workload(args, device)
    from vtprune.patches import visual_token_counts

    n_visual = visual_token_counts(model.config, inputs["input_ids"][:1])[0]
    too_many = [k for k in keeps if isinstance(k, int) and k > n_visual]
    if too_many:
        raise ProfileError(f"--keeps {too_many}: more than the {n_visual} visual tokens of this model's image")
    plan = [(None, None)] + [(p, k) for p in args.pruners for k in keeps]
    rows = []
    with tqdm(total=len(plan) * (args.warmup + args.repeats), desc="profile", unit="run", file=sys.stderr) as bar:
        for pruner, keep in plan:
            bar.set_postfix_str(pruner or "unpruned")
            rows.append(
                measure(
                    model,
                    inputs,
                    pruner,
                    keep,
                    new_tokens=args.new_tokens,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    progress=bar.update,
                )
            )
    print(
        f"{description}; batch {args.batch_size}, {args.new_tokens} new tokens, {device}, "
        f"{count_phrase(torch.get_num_threads(), 'thread')}; {runs_phrase(args.repeats)} per row after "
        f"{count_phrase(args.warmup, 'warm-up run')}; IQR: the prefill times' interquartile range (their noise)"
    )
    print(table(rows))
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        plot(rows, args.plot, description)
        print(f"wrote {args.plot}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ProfileError, FileNotFoundError) as error:
        print(f"vtprune profile: error: {error}", file=sys.stderr)
        return 2
