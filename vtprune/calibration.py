"""VFlowOpt's training-free calibration: its settings chosen so that, on a few calibration prompts, the
last prompt token's final hidden state moves least when pruned (the paper's "visual information flow").

    settings = vtprune.calibration.calibrate_vflowopt(model, samples, keep=64, seed=0, out="vflowopt.json")
    vtprune.apply(model, "vflowopt", keep=64, settings="vflowopt.json")

As the reference: a Gaussian-process Bayesian optimisation (scikit-optimize's ``Optimizer``, its
defaults: ``gp_hedge``) over r_v, r_1, t, m and alpha_v, r_2 following from the budget, maximising the
sum over the samples of the cosine between the unpruned and the pruned state (a NaN counts 0), 300
evaluations from 27 random ones by default. ``python -m vtprune calibrate`` runs it on the proxy, the
tiny model or a local checkpoint with a file of questions. Needs ``pip install -e ".[calibrate]"``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable

import torch

import vtprune
from vtprune.pruners.vflowopt import VFlowOpt, VFlowOptSettings, llm_ratios

SPACE_NOTE = "r_v in [T, 1.5 T], r_1 in [0.2 / 0.375, 1], t in [0, 50], m in [3, 24], alpha_v in [-1, 1]"


@torch.no_grad()
def last_token_state(model, inputs: dict) -> torch.Tensor:
    """(B, D) fp32 the final hidden state (after the decoder's last norm) of each prompt's last token."""
    return model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1].float()


def _visual_tokens(model, inputs: dict) -> int:
    """Visual tokens of the first image of ``inputs`` as the language model would get them unpruned."""
    with vtprune.apply(model, "random", keep=1.0) as handle, torch.no_grad():
        model(**inputs)
    return handle.last.layer_tokens[0][0]


def search_space(target: float) -> list[tuple[float, float]]:
    """The reference's bounds for a budget of ``target`` (its 25% run's, scaled): ``SPACE_NOTE``."""
    return [(target, min(1.0, 1.5 * target)), (0.2 / 0.375, 1.0), (0.0, 50.0), (3.0, 24.0), (-1.0, 1.0)]


def settings_at(point, target: float, num_layers: int) -> VFlowOptSettings:
    """The settings of one point (r_v, r_1, t, m, alpha_v) of the search space, r_2 from the budget."""
    r_v, r_1, threshold, cell, entropy = (float(v) for v in point)
    r_1, r_2 = llm_ratios(min(1.0, target / r_v), r_1, num_layers)
    return VFlowOptSettings(r_v, (r_1, r_2), threshold, cell, entropy, target)


def calibrate_vflowopt(
    model,
    samples: Iterable[dict],
    keep: int | float = 64,
    *,
    iterations: int = 300,
    initial_points: int = 27,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> VFlowOptSettings:
    """The VFlowOpt settings for ``keep`` (as ``vtprune.VFlowOpt``'s) that keep ``model``'s last-token
    state closest to unpruned on ``samples`` (each a dict of model inputs for one prompt and its
    images, as a processor returns them). Reproducible: the same samples and ``seed`` give the same
    settings. ``out``: the settings file to write (``VFlowOptSettings.save``). ``log``: a JSON-lines file
    of the evaluations so far; a run given the same log resumes where it stopped. ``progress(i, score,
    best)`` is called after each evaluation (score: the mean cosine)."""
    try:
        from skopt import Optimizer
    except ImportError:
        raise ImportError('VFlowOpt calibration needs scikit-optimize: pip install -e ".[calibrate]"') from None
    VFlowOpt(keep=keep)  # checks keep
    for name, value, low in (("iterations", iterations, 1), ("initial_points", initial_points, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    samples = list(samples)
    if not samples or not all(isinstance(s, dict) and "input_ids" in s for s in samples):
        raise ValueError("samples must be a non-empty list of model-input dicts (input_ids, pixel_values, ...)")
    handle = vtprune.handle_of(model)
    if handle is not None:
        raise ValueError(
            "remove the pruner applied to the model first (handle.remove()): calibration compares with unpruned"
        )
    n = _visual_tokens(model, samples[0])
    target = min(1.0, keep / n if isinstance(keep, numbers.Integral) else float(keep))
    num_layers = model.config.get_text_config().num_hidden_layers
    unpruned = [last_token_state(model, s) for s in samples]

    def score(settings: VFlowOptSettings) -> float:
        total = 0.0
        with vtprune.apply(model, VFlowOpt(keep=keep, settings=settings)):
            for inputs, reference in zip(samples, unpruned):
                cos = torch.nn.functional.cosine_similarity(last_token_state(model, inputs), reference, dim=-1)
                total += float(torch.nan_to_num(cos, nan=0.0).sum())
        return total / len(samples)

    optimizer = Optimizer(search_space(target), random_state=seed, n_initial_points=min(initial_points, iterations))
    done = _read_log(log)
    best, best_score = None, -math.inf
    for i in range(iterations):
        point = optimizer.ask()
        if i < len(done):  # resuming: the same point comes back; its score is known
            if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(point, done[i]["point"])):
                raise ValueError(f"{log} was written by another calibration (seed, samples or keep differ)")
            value = done[i]["score"]
        else:
            value = score(settings_at(point, target, num_layers))
            _append_log(log, {"point": [float(v) for v in point], "score": value})
        optimizer.tell(point, -value)
        if value > best_score:
            best, best_score = point, value
        if progress is not None:
            progress(i, value, best_score)
    settings = settings_at(best, target, num_layers)
    if out is not None:
        settings.save(
            out,
            objective=best_score,
            samples=len(samples),
            iterations=iterations,
            seed=seed,
            keep=keep,
            space=SPACE_NOTE,
        )
    return settings


def _read_log(log) -> list[dict]:
    if log is None or not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append_log(log, entry: dict) -> None:
    if log is not None:
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def proxy_samples(processor, n: int, seed: int, dtype) -> list[dict]:
    """``n`` seeded easy-vqa *train* questions (never the test split the proxy is judged on), as inputs."""
    from vtprune.proxy import data
    from vtprune.proxy import prompt as fmt

    out = []
    for q in data.subset("train", n, seed):
        inputs = processor(
            images=[data.load_image(q.split, q.image_id)], text=[fmt.prompt(q.text)], return_tensors="pt"
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out.append(dict(inputs))
    return out


def file_samples(processor, path, n: int, seed: int, dtype) -> list[dict]:
    """``n`` seeded lines of a JSON-lines file of ``{"image": path, "question": text}`` (image paths
    relative to the file), as inputs through the processor's chat template."""
    import random
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or not all(isinstance(r, dict) and {"image", "question"} <= set(r) for r in rows):
        raise ValueError(f'{path}: each line must be a JSON object with "image" and "question"')
    rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))]
    out = []
    for r in rows:
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
        with Image.open(path.parent / r["image"]) as image:
            inputs = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out.append(dict(inputs))
    return out


def main(argv: list[str]) -> int:
    """``vtprune calibrate``: write VFlowOpt settings for a model and a budget."""
    from vtprune.cli_parser import OneLineParser

    parser = OneLineParser(
        prog="vtprune calibrate",
        description="Choose VFlowOpt's settings for a model and a budget by its training-free calibration "
        "(Bayesian optimisation of the last prompt token's state, pruned vs unpruned) and write them to a file "
        "for vtprune.apply(model, 'vflowopt', keep=K, settings=FILE).",
    )
    parser.add_argument("--model", required=True, help="proxy (the real-weights proxy), tiny, or a local checkpoint")
    parser.add_argument("--data", help='with a checkpoint: JSON lines of {"image": path, "question": text}')
    parser.add_argument("--keep", type=_keep, default=64, help="the budget, as vflowopt's keep (default 64)")
    parser.add_argument("--samples", type=int, default=30, help="calibration prompts (default 30)")
    parser.add_argument("--iterations", type=int, default=300, help="evaluations (default 300)")
    parser.add_argument("--initial-points", type=int, default=27, help="random evaluations first (default 27)")
    parser.add_argument("--seed", type=int, default=0, help="samples and optimiser seed (default 0)")
    parser.add_argument("--out", required=True, help="the settings file to write (JSON)")
    parser.add_argument("--log", help="JSON lines of the evaluations: a run given the same log resumes")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if (args.data is not None) != (args.model not in ("proxy", "tiny")):
        parser.error("give --data with a checkpoint directory, and only then")
    torch.manual_seed(args.seed)
    if args.model == "tiny":
        from vtprune.testing import batch_inputs, make_prompt, tiny_llava

        model = tiny_llava()
        prompt = make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11, 12])
        samples = [batch_inputs(model, [prompt], seed=args.seed + i) for i in range(args.samples)]
    elif args.model == "proxy":
        from vtprune import proxy

        if not proxy.available():
            parser.error(f"the proxy needs: {', '.join(proxy.missing())}")
        model, processor = proxy.load_proxy()
        samples = proxy_samples(processor, args.samples, args.seed, model.dtype)
    else:
        from vtprune.patches.loading import check_model_path, load_model

        model, processor = load_model(check_model_path(args.model))
        samples = file_samples(processor, args.data, args.samples, args.seed, model.dtype)

    def report(i: int, value: float, best: float) -> None:
        print(f"{i + 1}/{args.iterations}: mean cosine {value:.5f} (best {best:.5f})", flush=True)

    settings = calibrate_vflowopt(
        model,
        samples,
        args.keep,
        iterations=args.iterations,
        initial_points=args.initial_points,
        seed=args.seed,
        out=args.out,
        log=args.log,
        progress=report,
    )
    print(f"wrote {args.out}: {settings}")
    return 0


def _keep(text: str):
    from vtprune.pruners.base import keep_from_text

    try:
        return keep_from_text(text)
    except ValueError as error:
        import argparse

        raise argparse.ArgumentTypeError(str(error)) from None
