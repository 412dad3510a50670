"""Can the proxy's frozen language model answer easy-vqa when told the image in words?

    python scripts/proxy_text_oracle.py --n 1000 --threads 2

No image and no projector: in place of the image, each prompt states the image's true shape and colour
("The image shows a red circle."), in several prompt templates, and the answer is scored as the
evaluator scores it (the best of the 13 answers by the logit of its first token). Accuracy is reported
per kind (``vtprune.proxy.evaluate.accuracy_by_kind``) with the share of yes/no questions answered
"yes". If, for yes/no questions, accuracy with the named thing present plus accuracy with it absent
stays near 100%, the model answers them from their wording, whatever the caption says.

Scoring by first token is the evaluator's rule, not the untrained model's habit: it starts its answers
with "The" or "Yes", and the shape answers start with sub-word pieces ("rect", "tri"), so shape questions
score near 0 here. For yes/no questions the script therefore also reports how well the margin
logit(yes) - logit(no), lower-case and capitalised, read through the negation, separates present from
absent things (ROC AUC; 0.5 means the answer does not depend on the caption).
"""

from __future__ import annotations

import argparse
import sys
import time

# {caption} is "a red circle"; {question} is the easy-vqa question. All end where the answer starts.
TEMPLATES = {
    "caption in place of the image": "<|im_start|>user\nThe image shows {caption}.\n{question}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "caption, 'answer yes or no'": "<|im_start|>user\nThe image shows {caption}.\n{question} Answer yes or no."
    "<|im_end|>\n<|im_start|>assistant\n",
    "question before caption": "<|im_start|>user\n{question}\nThe image shows {caption}.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "SmolLM2 system turn": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nThe image shows {caption}.\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "context / question / one word": "<|im_start|>user\nContext: there is exactly one shape in the image, "
    "{caption}.\nQuestion: {question}\nAnswer in one word.<|im_end|>\n<|im_start|>assistant\n",
}


def presence_auc(items, margins) -> float:
    """ROC AUC of ``margins`` (a "yes" margin per question) for telling present from absent named things.

    A negated question's margin is flipped first, so a high value always means "the model says it is
    there". Questions that are not yes/no are ignored; ties count half. NaN without both classes.
    """
    from vtprune.proxy import data

    present, absent = [], []
    for q, m in zip(items, margins):
        named = data.named_present(q)
        if named is not None:
            (present if named else absent).append(-m if data.kind(q) == "yes/no negated" else m)
    if not present or not absent:
        return float("nan")
    wins = sum((p > a) + 0.5 * (p == a) for p in present for a in absent)
    return wins / (len(present) * len(absent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="questions of the fixed test subset (data.subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.evaluate import accuracy, accuracy_by_kind, answer_first_tokens

    model, processor = load_proxy()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # the last position is every row's answer position
    labels = data.image_labels("test")
    items = [q for q in data.subset("test", args.n, 0) if q.image_id in labels]
    candidates, names = answer_first_tokens(tokenizer), data.answers()
    yes_no = {
        spelling: [tokenizer.encode(word, add_special_tokens=False)[0] for word in pair]
        for spelling, pair in (("yes/no", ("yes", "no")), ("Yes/No", ("Yes", "No")))
    }
    print(f"{len(items)} of the first {args.n} subset questions have a labelled image")
    for title, template in TEMPLATES.items():
        start, predictions, margins = time.perf_counter(), [], {spelling: [] for spelling in yes_no}
        for s in range(0, len(items), args.batch_size):
            batch = items[s : s + args.batch_size]
            texts = []
            for q in batch:
                shape, colour = labels[q.image_id]
                texts.append(template.format(caption=f"a {colour} {shape}", question=q.text))
            inputs = tokenizer(texts, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, vocab)
            predictions.extend(names[i] for i in logits[:, candidates].argmax(-1).tolist())
            for spelling, (yes, no) in yes_no.items():
                margins[spelling].extend((logits[:, yes] - logits[:, no]).tolist())
        by_kind = accuracy_by_kind(items, predictions)
        yes_share = {}
        for name, kind in (("plain", "yes/no"), ("negated", "yes/no negated")):
            answered = [p for q, p in zip(items, predictions) if data.kind(q) == kind]
            yes_share[name] = answered.count("yes") / max(1, len(answered))
        print(f"\n{title} ({time.perf_counter() - start:.0f} s): all {100 * accuracy(items, predictions):.1f}%")
        print("  " + " | ".join(f"{name} {100 * value:.1f}%" for name, value in by_kind.items()))
        print("  answered 'yes': " + " | ".join(f"{k} yes/no {100 * v:.1f}%" for k, v in yes_share.items()))
        aucs = {spelling: presence_auc(items, m) for spelling, m in margins.items()}
        print("  present-vs-absent AUC of the yes margin: " + " | ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
