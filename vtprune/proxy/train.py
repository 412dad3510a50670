"""Projector training on easy-vqa with the image prefix shared by all questions about an image.

A training example is one image and all its questions. The prefix ``<|im_start|>user\\n`` + 256
projected visual tokens is the same for every question about the image, so it runs once (all images
of a step in one batch, every prefix has the same length) and its key/value cache is gathered for each
question; the questions (suffix + answer) run as one right-padded batch on top. Gradients flow back
through the cache into the projector. The loss is the cross-entropy of the answer tokens only (the
answer word and ``<|im_end|>``). Tower and language model are frozen; only the projector trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtprune.proxy import prompt as fmt


@dataclass
class Batch:
    """One step's tensors. P: prefix text tokens, Q: questions, S: longest suffix."""

    features: torch.Tensor  # (B, 256, 384) float32 tower features of the B images
    prefix_ids: torch.Tensor  # (P,) long: tokens before the visual tokens
    suffix_ids: torch.Tensor  # (Q, S) long, right-padded
    suffix_mask: torch.Tensor  # (Q, S) long: 1 on real tokens
    labels: torch.Tensor  # (Q, S) long: next-token targets, -100 except where the next token is an answer token
    image_index: torch.Tensor  # (Q,) long: which of the B images each question is about


def encode_examples(tokenizer, features: torch.Tensor, questions_per_image, pad_id: int) -> Batch:
    """A ``Batch`` from (B, 256, 384) ``features`` and, per image, a list of (question, answer) pairs."""
    if features.ndim != 3 or features.shape[0] != len(questions_per_image):
        raise ValueError(f"features must be (B, T, D) with B = {len(questions_per_image)}, got {tuple(features.shape)}")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prefix = encode(fmt.USER_START)
    rows, targets, owners = [], [], []
    for image, pairs in enumerate(questions_per_image):
        for question, answer in pairs:
            context, target = encode(fmt.question_suffix(question)), encode(fmt.answer_text(answer))
            rows.append(context + target)
            # labels[i] is the token at i + 1: answer tokens are predicted from the position before each.
            targets.append([-100] * (len(context) - 1) + target + [-100])
            owners.append(image)
    if not rows:
        raise ValueError("no questions in the batch")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    return Batch(features, torch.tensor(prefix), ids, mask, labels, torch.tensor(owners))


def answer_loss(model, projector: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (a scalar with a graph to ``projector``).

    ``model`` is the LLaVA whose language model and embeddings are used (frozen); ``projector`` maps the
    (B, 256, 384) features to (B, 256, 576) and may differ from ``model``'s own (e.g. a reparametrised copy).
    """
    logits = answer_logits(model, projector, batch)
    return nn.functional.cross_entropy(logits.float(), batch.labels[batch.labels != -100])


def answer_logits(model, projector: nn.Module, batch: Batch) -> torch.Tensor:
    """(A, vocab) logits at the A scored positions of ``batch`` (row by row, where ``labels != -100``).

    ``projector`` maps ``batch.features`` (B, T, D) to the (B, T, H) visual embeddings.
    """
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    b = batch.features.shape[0]
    visual = projector(batch.features)  # (B, 256, H)
    text = embed(batch.prefix_ids)[None].expand(b, -1, -1)  # (B, P, H)
    prefix = torch.cat([text, visual.to(text.dtype)], dim=1)  # (B, P + 256, H)
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=prefix, past_key_values=cache, use_cache=True)
    cache.batch_select_indices(batch.image_index)  # (Q, heads, P + 256, d) per layer
    n_prefix = prefix.shape[1]
    q, s = batch.suffix_ids.shape
    mask = torch.cat([torch.ones(q, n_prefix, dtype=torch.long), batch.suffix_mask], dim=1)  # (Q, P + 256 + S)
    positions = torch.arange(n_prefix, n_prefix + s)[None].expand(q, -1)
    hidden = lm(
        input_ids=batch.suffix_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state  # (Q, S, H)
    scored = batch.labels != -100
    return model.lm_head(hidden[scored])  # (answer tokens, vocab): the LM head only where it is scored


class StandardizedProjector(nn.Module):
    """The LLaVA projector applied to per-channel standardised features ``(x - mean) / std``.

    DINOv2's last-block features (before the final LayerNorm) have channels of very different scales;
    training on standardised inputs conditions the first layer, and since the standardisation is a
    per-channel affine map it folds exactly into ``linear_1`` afterwards (``fold_into``), so the
    deployed model keeps LLaVA's plain projector.
    """

    def __init__(self, projector: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.inner = projector
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner((features - self.mean) / self.std)

    @torch.no_grad()
    def fold_into(self, target: nn.Module) -> None:
        """Write weights into ``target`` (a plain projector) such that target(x) == self(x)."""
        w, bias = self.inner.linear_1.weight, self.inner.linear_1.bias  # (H, D), (H,)
        folded = w / self.std  # scales input column j by 1 / std_j
        target.linear_1.weight.copy_(folded)
        target.linear_1.bias.copy_(bias - folded @ self.mean)
        target.linear_2.load_state_dict(self.inner.linear_2.state_dict())
