"""Latency, memory and compute of one (model, inputs, pruner, keep): what ``vtprune profile`` reports.

Every time is the median of ``repeats`` runs after ``warmup`` runs, CUDA-synchronised on GPUs:

- ttft_ms: ``generate()`` called until its first token exists (vision tower + prefill + sampling);
- prefill_ms: one forward over the prompt (vision tower included), as ``generate()``'s first step;
- prefill_iqr_ms: the interquartile range of those prefill times (their noise: a difference between
  rows smaller than it is not a measured difference);
- decode_ms_per_token: the median gap between consecutive decode steps of ``generate()``;
- peak_memory_mb: the peak allocated during one ``generate()`` above what was allocated before it
  (CUDA: torch's allocator; CPU: the process's peak resident memory, Linux only);
- kv_cache_mb: the keys and values the prefill leaves in the cache (pruned layers hold fewer);
- kv_cache_end_mb: the keys and values held once ``generate()`` has produced its last token (the prompt
  and every generated token but the last; a decode stage's cache policy leaves fewer visual entries;
  with several samples, shorter ones' padding slots count);
- end_layer_tokens: the visual entries per decoder layer (mean over layers, first sample) the cache
  holds then: after a cache policy's last choice, else what entered each layer in the prefill;
- prefill_gflops: ``flops.prefill_flops`` from the tokens that entered each decoder layer.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

import vtprune
from vtprune.patches import visual_token_counts
from vtprune.profiling.flops import prefill_flops
from vtprune.timing import ForwardClock, Spread, peak_memory_available, peak_memory_growth


@dataclass
class Measurement:
    pruner: str
    keep: int | float | None
    visual_tokens: int  # per sample, before pruning (the first sample's)
    kept_tokens: int  # reaching the last decoder layer (the first sample's)
    mean_layer_tokens: float  # visual tokens per decoder layer, averaged over layers (first sample)
    ttft_ms: float
    prefill_ms: float
    prefill_iqr_ms: float
    decode_ms_per_token: float
    peak_memory_mb: float | None
    kv_cache_mb: float
    kv_cache_end_mb: float
    end_layer_tokens: float  # visual entries per decoder layer held after the last decode step (first sample)
    prefill_gflops: float


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _peak_bytes(fn, device: torch.device) -> tuple[int | None, object]:
    """Runs ``fn`` once: the peak bytes it allocated above what was allocated before (None where this
    device gives no reading) and what it returned."""
    result = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.append(fn())
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result[0]
    if device.type == "cpu" and peak_memory_available():
        return peak_memory_growth(lambda: result.append(fn())), result[0]
    return None, fn()


@torch.no_grad()
def measure(
    model,
    inputs: dict,
    pruner: str | None,
    keep=None,
    *,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    progress=None,
    **options,
) -> Measurement:
    """Profile ``model`` on ``inputs`` unpruned (``pruner=None``) or under ``vtprune.apply(model,
    pruner, keep=keep, **options)``; see the module docstring. ``progress()`` is called after each run."""
    device = next(model.parameters()).device
    handle = vtprune.apply(model, pruner, keep=keep, **options) if pruner is not None else None
    clock = ForwardClock(model)
    generate_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    try:
        ttft, prefill, decode = [], [], []
        for run in range(warmup + repeats):
            clock.start()
            model.generate(**inputs, **generate_kwargs)
            first_token, steps = clock.first_seconds, clock.ends
            clock.start()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            if run >= warmup:
                ttft.append(first_token)
                prefill.append(clock.first_seconds)
                decode.extend(b - a for a, b in zip(steps, steps[1:]))
            if progress is not None:
                progress()
        kv_bytes = _cache_bytes(out.past_key_values)
        del out
        peak, out = _peak_bytes(
            lambda: model.generate(**inputs, **generate_kwargs, return_dict_in_generate=True), device
        )
        end_bytes = _cache_bytes(out.past_key_values)
        del out
        visual = visual_token_counts(model.config, inputs["input_ids"])
        stats = handle.last if handle is not None else None
    finally:
        clock.close()
        if handle is not None:
            handle.remove()
    n_layers = len(stats.layer_tokens[0]) if stats is not None else _decoder_layers(model)
    layers = stats.layer_tokens if stats is not None else [[v] * n_layers for v in visual]
    held = stats.decode_tokens[0][-1] if stats is not None and stats.decode_tokens else layers[0]
    prefill_spread = Spread.of(prefill)
    text = [int(n) - v for n, v in zip(inputs["attention_mask"].sum(-1).tolist(), visual)]
    return Measurement(
        pruner=pruner or "none",
        keep=keep,
        visual_tokens=visual[0],
        kept_tokens=layers[0][-1] if stats is None else stats.token_counts[0],
        mean_layer_tokens=sum(layers[0]) / len(layers[0]),
        ttft_ms=statistics.median(ttft) * 1e3,
        prefill_ms=prefill_spread.median * 1e3,
        prefill_iqr_ms=(prefill_spread.high - prefill_spread.low) * 1e3,
        decode_ms_per_token=statistics.median(decode) * 1e3 if decode else float("nan"),
        peak_memory_mb=None if peak is None else peak / 2**20,
        kv_cache_mb=kv_bytes / 2**20,
        kv_cache_end_mb=end_bytes / 2**20,
        end_layer_tokens=sum(held) / len(held),
        prefill_gflops=prefill_flops(model.config, text, layers) / 1e9,
    )


def _decoder_layers(model) -> int:
    text = getattr(model.config, "text_config", None) or model.config
    return text.num_hidden_layers
