"""Train the proxy's projector on easy-vqa (tower and language model frozen) and save it as safetensors.

    python scripts/train_proxy.py --out vtprune/proxy/projector.safetensors --seed 0 --steps 777 --threads 2 \\
        --eval-n 0 --eval-every 10000

made the committed projector (run as ``--minutes 70``, which resolved to 777 steps of about 5.4 s on
2 cores: 70 minutes; the step count alone fixes the schedule, so ``--steps 777`` repeats it).

Recipe: AdamW on the projector only, linear warm-up then cosine decay to 0 over the run, features
standardised per channel during training (folded into ``linear_1`` when saved), each step = several
images with all their questions, the image prefix shared by its questions (``vtprune.proxy.train``).
With ``--minutes`` the number of steps is fixed after timing the first steps (logged: pass it back as
``--steps`` to repeat a run exactly). Tower features are cached on disk as they are first needed.
Accuracy is measured with ``vtprune.proxy.evaluate`` (the full model, as a pruner would see it).

``--balance-yes-no`` trains on ``data.balance_yes_no`` (as many yes/no questions about absent things
as about present ones): without it the projector learns easy-vqa's answer prior for yes/no questions
(82% "absent"). Continued from the committed projector for 300 steps with it, yes/no fell to chance
(see the README), so the committed projector is trained without it.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to save the projector (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None, help="training time budget (evaluations excluded)")
    p.add_argument("--steps", type=int, default=None, help="number of optimiser steps (overrides --minutes)")
    p.add_argument("--images-per-step", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--balance-yes-no",
        action="store_true",
        help="per image, as many yes/no questions about absent things as about present ones (data.balance_yes_no)",
    )
    p.add_argument("--no-standardize", action="store_true", help="train linear_1 on raw features")
    p.add_argument("--threads", type=int, default=1, help="torch threads (leave a core to others)")
    p.add_argument("--cache-dir", type=Path, default=None, help="proxy cache (default: $VTPRUNE_CACHE/proxy)")
    p.add_argument("--eval-every", type=float, default=20.0, help="minutes of training between evaluations")
    p.add_argument("--eval-n", type=int, default=100, help="test questions per intermediate evaluation")
    p.add_argument("--final-eval-n", type=int, default=1000, help="test questions for the final evaluation (0: skip)")
    p.add_argument("--init", type=Path, default=None, help="start from this projector file")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        p.error("give --steps or --minutes")
    if args.out.suffix != ".safetensors":
        p.error("--out must end in .safetensors")
    for name in ("images_per_step", "threads", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from tqdm import tqdm

    from vtprune.proxy import data, evaluate, load_proxy
    from vtprune.proxy.features import FeatureCache
    from vtprune.proxy.load import default_cache_dir, save_projector
    from vtprune.proxy.train import StandardizedProjector, answer_loss, encode_examples

    def log(*parts):
        print(*parts, flush=True)

    log(f"args: {vars(args)}")
    start = time.perf_counter()
    model, processor = load_proxy(args.cache_dir, projector=args.init)
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = processor.tokenizer
    cache_root = (args.cache_dir or default_cache_dir()) / "features"
    train_questions = data.questions("train")
    if args.balance_yes_no:  # drawn once, before training, from a generator of its own
        train_questions = data.balance_yes_no(train_questions, random.Random(args.seed))
    train_images = data.by_image(train_questions)
    features = FeatureCache(cache_root, "train", 1 + max(train_images))
    log(
        f"loaded in {time.perf_counter() - start:.0f} s; {len(train_images)} train images, "
        f"{len(train_questions)} questions, "
        f"{features.count_done} with cached features"
    )

    # Re-initialise the projector from the seed (unless --init), then wrap it for training.
    projector = model.model.multi_modal_projector
    if args.init is None:
        torch.manual_seed(args.seed)
        for layer in (projector.linear_1, projector.linear_2):
            layer.reset_parameters()
    order = list(train_images)
    rng.shuffle(order)
    stats_ids = order[:64]
    sample = features.get(stats_ids, model, processor).flatten(0, 1)  # (64 * 256, 384)
    if args.no_standardize:
        mean, std = torch.zeros(sample.shape[-1]), torch.ones(sample.shape[-1])
    else:
        mean, std = sample.mean(0), sample.std(0)
    log(
        f"feature channel std: min {float(sample.std(0).min()):.3g} median {float(sample.std(0).median()):.3g} "
        f"max {float(sample.std(0).max()):.3g}"
    )
    import copy

    trainable = StandardizedProjector(copy.deepcopy(projector), mean, std)
    if args.init is not None:  # the file holds the folded projector: unfold it into standardised space
        with torch.no_grad():
            trainable.inner.linear_1.weight.mul_(std)
            trainable.inner.linear_1.bias.add_(projector.linear_1.weight @ mean)
    params = [p for p in trainable.inner.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)

    def lr_at(step, total):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def sync():
        trainable.fold_into(projector)

    def run_eval(n, label):
        sync()
        t = time.perf_counter()
        acc = evaluate(model, processor, n=n, seed=0)
        log(f"eval[{label}] n={n} accuracy={acc:.4f} ({time.perf_counter() - t:.0f} s)")
        return acc

    total = args.steps if args.steps is not None else 10**9
    budget = args.minutes * 60 if args.minutes is not None and args.steps is None else None
    cursor, step, train_time, next_eval = 0, 0, 0.0, args.eval_every * 60
    curve, smoothed = [], None
    bar = tqdm(
        total=total if args.steps is not None else None, desc="train", unit="step", file=sys.stdout, mininterval=30
    )
    while step < total:
        t = time.perf_counter()
        if cursor + args.images_per_step > len(order):  # next epoch, reshuffled
            rng.shuffle(order)
            cursor = 0
        ids = order[cursor : cursor + args.images_per_step]
        cursor += args.images_per_step
        feats = features.get(ids, model, processor)
        pairs = [[(q.text, q.answer) for q in train_images[i]] for i in ids]
        batch = encode_examples(tokenizer, feats, pairs, pad_id=tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total)
        loss = answer_loss(model, trainable, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        train_time += time.perf_counter() - t
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.update(1)
        if budget is not None and step == 5:
            total = max(args.warmup + 1, int(budget / (train_time / step)))
            bar.total = total
            log(
                f"\n{train_time / step:.2f} s/step -> {total} steps in {args.minutes} min (repeat with --steps {total})"
            )
        if step % 10 == 0:
            log(
                f"step {step}/{total} loss {value:.4f} smoothed {smoothed:.4f} lr {lr_at(step - 1, total):.2e} "
                f"train {train_time / 60:.1f} min, {features.count_done} images cached"
            )
        if args.eval_n and train_time >= next_eval and step < total:
            curve.append((round(train_time / 60, 1), step, run_eval(args.eval_n, f"{train_time / 60:.1f} min")))
            next_eval += args.eval_every * 60
            sync()
            save_projector(model, args.out)
    bar.close()
    sync()
    save_projector(model, args.out)
    log(f"saved {args.out} after {step} steps, {train_time / 60:.1f} min of training")
    if args.eval_n:
        curve.append((round(train_time / 60, 1), step, run_eval(args.eval_n, "end")))
    if args.final_eval_n:
        acc = run_eval(args.final_eval_n, "final")
        log(f"final unpruned accuracy on {args.final_eval_n} test questions: {acc:.4f}")
    log("curve (train minutes, step, accuracy on eval-n): " + ", ".join(f"{m}:{s}:{a:.3f}" for m, s, a in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
