"""How well can the proxy's frozen language model answer easy-vqa if it is told the image exactly?

    python scripts/proxy_ceiling.py --tokens 32 --steps 300 --threads 2

Instead of projected tower features, each image enters as K learned embeddings chosen by its true
(shape, colour) class: 24 classes x K tokens x 576, trained with the projector's loss and schedule
(``vtprune.proxy.train``), so the image is read perfectly and only the language model's use of it is
left. Accuracy on the test images' questions is reported per kind (``vtprune.proxy.data.kind``): if
yes/no stays low here, the limit is the frozen language model, not the projector or the tower.
Scoring is the evaluator's: the best of the 13 answers by the logit of its first token.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="learned embeddings per image (K)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=300, help="test images whose questions are scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--balance-yes-no",
        action="store_true",
        help="train on as many yes/no questions about absent things as about present ones (data.balance_yes_no)",
    )
    args = p.parse_args(argv)
    for name in ("tokens", "steps", "images_per_step", "eval_images", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.lr <= 0:
        p.error("--warmup must be >= 0 and --lr > 0")
    return args


def class_prompt(n_classes: int, tokens: int, hidden: int, scale: float):
    """A module mapping (B, K, C) one-hot classes to their (B, K, H) learned embeddings."""
    import torch
    from torch import nn

    class ClassPrompt(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(n_classes, tokens, hidden) * scale)  # (C, K, H)

        def forward(self, one_hot):
            return torch.einsum("bkc,ckh->bkh", one_hot, self.table)

    return ClassPrompt()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.evaluate import accuracy_by_kind, answer_first_tokens
    from vtprune.proxy.train import answer_logits, answer_loss, encode_examples

    model, processor = load_proxy()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = processor.tokenizer
    classes = [(s, c) for s in data.SHAPES for c in data.colours()]
    rng = random.Random(args.seed)
    questions = {split: data.by_image(data.questions(split)) for split in data.SPLITS}
    if args.balance_yes_no:
        questions["train"] = data.by_image(data.balance_yes_no(data.questions("train"), rng))
    labels = {split: data.image_labels(split) for split in data.SPLITS}

    def batch_of(split, ids):
        one_hot = torch.zeros(len(ids), args.tokens, len(classes))
        for b, i in enumerate(ids):
            one_hot[b, :, classes.index(labels[split][i])] = 1
        pairs = [[(q.text, q.answer) for q in questions[split][i]] for i in ids]
        return encode_examples(tokenizer, one_hot, pairs, pad_id=tokenizer.pad_token_id)

    scale = float(model.get_input_embeddings().weight.std())
    prompt = class_prompt(len(classes), args.tokens, model.config.text_config.hidden_size, scale)
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    train_ids = [i for i in labels["train"] if i in questions["train"]]
    smoothed, start = None, time.perf_counter()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss = answer_loss(model, prompt, batch_of("train", rng.sample(train_ids, args.images_per_step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {smoothed:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    candidates, names = answer_first_tokens(tokenizer), data.answers()
    right, total = Counter(), Counter()
    scored_items, predictions = [], []
    test_ids = list(labels["test"])[: args.eval_images]
    with torch.no_grad():
        for s in range(0, len(test_ids), 8):
            ids = test_ids[s : s + 8]
            batch = batch_of("test", ids)
            # Score only the first answer token of each row (the evaluator's rule).
            scored = batch.labels != -100
            first = torch.zeros_like(scored)
            first[torch.arange(len(scored)), scored.int().argmax(1)] = True
            batch.labels = batch.labels.masked_fill(~first, -100)
            choice = answer_logits(model, prompt, batch)[:, candidates].argmax(-1)  # (Q,)
            for c, q in zip(choice.tolist(), [q for i in ids for q in questions["test"][i]]):
                total[data.kind(q)] += 1
                right[data.kind(q)] += names[c] == q.answer
                scored_items.append(q)
                predictions.append(names[c])
    print(f"\nperfect-image ceiling, K={args.tokens}, {args.steps} steps, {len(test_ids)} test images:")
    print("| question kind | questions | accuracy |\n|---|---|---|")
    for kind in sorted(total):
        print(f"| {kind} | {total[kind]} | {100 * right[kind] / total[kind]:.1f}% |")
    print(f"| all | {sum(total.values())} | {100 * sum(right.values()) / sum(total.values()):.1f}% |")
    # Present + absent near 100% means the yes/no answer does not depend on the image (a fixed bias).
    by_kind = accuracy_by_kind(scored_items, predictions)
    print("\n" + " | ".join(f"{name} {100 * value:.1f}%" for name, value in by_kind.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
