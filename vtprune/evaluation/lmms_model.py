"""The lmms-eval model ``vtprune``: a supported Hugging Face VLM, pruned by any vtprune pruner, in batches.

    lmms-eval --model vtprune --model_args pretrained=PATH,pruner=divprune,keep=64 --tasks pope --batch_size 8

Unlike lmms-eval's ``llava_hf`` it runs batches (left padding; the same answers as batch size 1), lets
errors surface instead of answering ``""``, and reports per sample the visual tokens before and after
pruning and the prefill time (in the samples log, under ``token_counts``; means under ``throughput``).
Under ``accelerate launch`` every process loads the model on its own device and lmms-eval gives it
its share of the requests.
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image

import vtprune
from vtprune.evaluation.generation_hooks import ForcedTokens
from vtprune.evaluation.options import parse_model_args
from vtprune.evaluation.prompts import chat_prompt, truncate_at_stops
from vtprune.evaluation.records import PrunedTokenCounts
from vtprune.patches import visual_token_counts
from vtprune.patches.loading import load_model
from vtprune.timing import ForwardClock

GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")


class VtpruneLMM(lmms):
    """``--model vtprune``: see the module docstring. Model arguments: ``pretrained`` (required),
    ``pruner`` (``none`` or a name from ``vtprune.available()``) with its options (``keep=64``,
    ``layer=2``, ...), ``device``, ``dtype``, ``attn_implementation`` (default sdpa), ``max_new_tokens``
    (default for tasks that name none)."""

    is_simple = True

    def __init__(self, **model_args) -> None:
        super().__init__()
        options = parse_model_args(**model_args)  # fails here, before anything loads
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            device = str(self.accelerator.device)
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        else:
            device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        self.options = options
        self.model, self.processor = load_model(
            options.pretrained, dtype=options.dtype, attn_implementation=options.attn_implementation, device=device
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        pruner = options.pruner_config()
        self.handle = vtprune.apply(self.model, pruner) if pruner is not None else None
        self._clock = ForwardClock(self.model)  # its first forward end after start(): the prefill

    # lmms-eval reads these
    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    # --- requests -------------------------------------------------------------------------------
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _images(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        images = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(
                    f"vtprune's lmms-eval model takes PIL images; got {type(visual).__name__} (videos are not wired up)"
                )
            images.append(visual.convert("RGB"))
        return images

    def _batches(self, items: list[dict], key) -> list[list[int]]:
        """Indices of ``items`` in batches of ``batch_size``: grouped by ``key(item)``, longest prompt
        first within a group (so a batch pads little and memory problems show at once)."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(key(item), []).append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: -len(items[i]["text"]))
            batches += [indices[s : s + self.batch_size] for s in range(0, len(indices), self.batch_size)]
        return batches

    def _progress(self, batches: list, what: str):
        from tqdm import tqdm

        return tqdm(batches, desc=f"vtprune {what}", unit="batch", disable=self.rank != 0)

    def _inputs(self, texts: list[str], images: list[list]) -> dict:
        flat = [image for sample in images for image in sample]
        inputs = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs and inputs[name].is_floating_point():
                inputs[name] = inputs[name].to(self.model.dtype)
        return inputs

    def _counts(self, inputs, before, seconds: float, output_tokens=None) -> list[PrunedTokenCounts]:
        """Per sample of the batch just run: visual tokens before/after pruning and the prefill time."""
        visual = visual_token_counts(self.model.config, inputs["input_ids"])
        stats = self.handle.last if self.handle is not None else None
        fresh = stats is not None and stats is not before
        kept = stats.token_counts if fresh else visual
        per_layer = [sum(t) / len(t) for t in stats.layer_tokens] if fresh else visual
        prompt_tokens = inputs["attention_mask"].sum(-1).tolist()  # before pruning
        out = []
        for b in range(len(visual)):
            out.append(
                PrunedTokenCounts(
                    input_tokens=prompt_tokens[b],
                    output_tokens=None if output_tokens is None else output_tokens[b],
                    visual_tokens=visual[b],
                    kept_visual_tokens=kept[b],
                    mean_layer_visual_tokens=round(float(per_layer[b]), 2),
                    prefill_ms=round(seconds * 1e3, 3),
                    batch_size=len(visual),
                )
            )
        return out

    def _log(self, counts: list[PrunedTokenCounts], elapsed: float) -> None:
        if not counts:
            return
        generated = sum(c.output_tokens or 0 for c in counts)
        n = len(counts)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics={
                "visual_tokens": sum(c.visual_tokens for c in counts) / n,
                "kept_visual_tokens": sum(c.kept_visual_tokens for c in counts) / n,
                "mean_layer_visual_tokens": sum(c.mean_layer_visual_tokens for c in counts) / n,
                "prefill_ms": sum(c.prefill_ms for c in counts) / n,
            },
        )

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        unknown = sorted(k for k in gen_kwargs if k not in GENERATION_KEYS)
        if unknown:
            warnings.warn(f"vtprune: ignoring generation kwargs {unknown}", stacklevel=3)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = temperature > 0 or bool(gen_kwargs.get("do_sample"))
        kwargs = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.options.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": sample,
        }
        if sample:
            kwargs["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        return kwargs, until

    @torch.no_grad()
    def generate_until(self, requests) -> list[GenerationResult]:
        items = []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            images = self._images(doc_to_visual, task, split, doc_id)
            text = chat_prompt(self.processor, context, len(images))
            items.append({"text": text, "images": images, "gen_kwargs": gen_kwargs})
        results: list = [None] * len(items)
        counts_all = []
        start = time.perf_counter()
        batches = self._batches(items, key=lambda item: json.dumps(item["gen_kwargs"], sort_keys=True, default=str))
        for batch in self._progress(batches, "generate_until"):
            kwargs, until = self._generation_kwargs(items[batch[0]]["gen_kwargs"])
            inputs = self._inputs([items[i]["text"] for i in batch], [items[i]["images"] for i in batch])
            before = self.handle.last if self.handle is not None else None
            self._clock.start()
            output = self.model.generate(**inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            lengths = (new_tokens != self.tokenizer.pad_token_id).sum(-1).tolist()
            counts = self._counts(inputs, before, self._clock.first_seconds, lengths)
            counts_all += counts
            for i, text, count in zip(batch, texts, counts):
                results[i] = GenerationResult(text=truncate_at_stops(text, until), token_counts=count)
        self._log(counts_all, time.perf_counter() - start)
        return results

    def _continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        """The token ids ``continuation`` adds after ``prompt`` (tokenized together, as the model reads them)."""
        whole = self.tokenizer(prompt + continuation)["input_ids"]
        n = len(whole) - len(self.tokenizer(prompt)["input_ids"])
        if n < 1:
            raise ValueError(f"continuation {continuation!r} adds no token to the prompt")
        return whole[-n:]

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """log P(continuation | prompt) and whether greedy decoding would produce it, per request.

        Scored the way ``generate`` would produce the continuation: the prompt alone is prefilled (so
        text-guided pruners decide from the prompt, not from the answer being scored), then the
        continuation's tokens are fed after it through the (pruned) cache. Requests that share a
        prompt and all but their last continuation token (e.g. one-token answer choices) share one row.
        A continuation holding the end-of-sequence token before its last token is refused (generate()
        would stop the row there).
        """
        rows: dict[tuple, dict] = {}  # (prompt, document, continuation[:-1]) -> one prefill + chunk
        wanted = []  # per request: (row key, continuation ids)
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            images = self._images(doc_to_visual, task, split, doc_id)
            prompt = chat_prompt(self.processor, context, len(images))
            ids = self._continuation_ids(prompt, continuation)
            if self.tokenizer.eos_token_id in ids[:-1]:
                raise ValueError(f"continuation {continuation!r} holds the end-of-sequence token before its end")
            key = (prompt, task, split, doc_id, tuple(ids[:-1]))
            rows.setdefault(key, {"text": prompt, "images": images, "chunk": ids[:-1]})
            wanted.append((key, ids))
        keys = list(rows)
        items = [rows[k] for k in keys]
        log_probs: dict[tuple, torch.Tensor] = {}  # row key -> (len(chunk) + 1, vocab)
        counts_of: dict[tuple, PrunedTokenCounts] = {}
        counts_all = []
        start = time.perf_counter()
        for batch in self._progress(self._batches(items, key=lambda item: ""), "loglikelihood"):
            inputs = self._inputs([items[i]["text"] for i in batch], [items[i]["images"] for i in batch])
            before = self.handle.last if self.handle is not None else None
            self._clock.start()
            # generate() itself feeds the continuation (forced token by token), so positions, masks
            # and the pruned cache follow every model family's own decoding path.
            forcing = ForcedTokens([items[i]["chunk"] for i in batch])
            out = self.model.generate(
                **inputs,
                max_new_tokens=forcing.steps,
                do_sample=False,
                logits_processor=[forcing],
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            counts = self._counts(inputs, before, self._clock.first_seconds)
            steps = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)  # (B, steps, vocab), unprocessed
            for row, i in enumerate(batch):
                log_probs[keys[i]] = steps[row]
                counts_of[keys[i]] = counts[row]
            counts_all += counts
        self._log(counts_all, time.perf_counter() - start)
        results = []
        for key, ids in wanted:
            table = log_probs[key][: len(ids)]  # row j: the distribution of continuation token j
            target = torch.tensor(ids, device=table.device)
            score = float(table.gather(-1, target[:, None]).sum())
            greedy = bool((table.argmax(-1) == target).all())
            # lmms-eval 0.7.3 turns any answer that is not text or a GenerationResult into str(answer),
            # which breaks multiple-choice scoring; a GenerationResult passes the pair through as is.
            results.append(GenerationResult(text=(score, greedy), token_counts=counts_of[key]))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune's lmms-eval model does not run multi-round tasks")

    def clean(self):
        self._clock.close()
        super().clean()
