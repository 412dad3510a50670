"""Cost of Max-Min Diversity selection (DivPrune's rule) against its naive form and against prefill.

For N visual tokens of width D = 1024 and k = N / 9 kept (LLaVA-1.5: 576, LLaVA-NeXT: 2,880, a
20-frame video: 11,520), times and measures the peak memory of

* naive: the published algorithm's shape: the whole N x N cosine-distance matrix, then per pick the
  minimum over the rows of everything picked so far (a Python loop);
* torch: ``vtprune.ops.max_min_diversity(backend="torch")``, running minimum, blocked first pick;
* triton (CUDA only): the same op's kernels, timed with device synchronisation;

and reports selection time as a fraction of the LLM prefill of the benchmark model (Llama decoder,
hidden 1024, 8 layers, as in ``bench_prefill.py``) on N visual + 70 text tokens.

    python scripts/bench_ops.py                      # CPU: N = 576, 2880, 11520
    python scripts/bench_ops.py --sizes 576 2880 --repeats 3
    python scripts/bench_ops.py --device cuda        # on a GPU machine: adds the Triton column

Peak memory is the growth of the process's peak resident set (CPU, Linux) or of
``torch.cuda.max_memory_allocated`` (CUDA) above the inputs, after one warm-up run.
"""

from __future__ import annotations

import argparse
import platform

import torch

from vtprune.ops import max_min_diversity
from vtprune.testing import LLAVA_SHAPED_LLM, tiny_llava
from vtprune.timing import median_seconds, peak_memory_growth

TEXT_TOKENS = 70
# Peak RSS moves in page-sized steps and is sampled lazily by the kernel: smaller growth reads as noise.
RESOLUTION = 1 << 20


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}" if nbytes >= RESOLUTION else "< 1"


def naive_max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """Full distance matrix; each pick re-takes the minimum over all picked rows."""
    u = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - u @ u.T
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        if i == 0:
            # Second-smallest entry of each column: the smallest is the row's distance to itself.
            scores = dist.topk(2, dim=0, largest=False).values[1]
        else:
            scores = dist.index_select(0, picks[:i]).min(dim=0).values
        picks[i] = scores.argmax()
    return picks


def synchronized(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def peak_growth(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_memory_growth(fn)


def prefill_seconds(lm, lm_head, n: int, repeats: int, device) -> float:
    embeds = torch.randn(1, n + TEXT_TOKENS, lm.config.hidden_size, device=device)

    def run():
        hidden = lm(inputs_embeds=embeds).last_hidden_state
        return lm_head(hidden[:, -1:])

    return median_seconds(synchronized(run, device), repeats=repeats, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 2880, 11520])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    model = tiny_llava(vision_hidden=32, vision_layers=1, **LLAVA_SHAPED_LLM).to(device)
    lm, lm_head = model.model.language_model, model.lm_head

    backends = {"naive": naive_max_min_diversity, "torch": lambda x, k: max_min_diversity(x, k, backend="torch")}
    if device.type == "cuda":
        backends["triton"] = lambda x, k: max_min_diversity(x, k, backend="triton")
    header = " | ".join(f"{name} ms | {name} peak MiB" for name in backends)
    print(f"\n| N | k | {header} | naive / torch time | naive / torch memory | prefill ms | torch / prefill |")
    print("|---|---|" + "---|---|" * len(backends) + "---|---|---|---|")
    for n in args.sizes:
        k = max(1, n // 9)
        x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(n)).to(device)
        times, peaks = {}, {}
        picks = {}
        for name, fn in backends.items():
            run = synchronized(lambda fn=fn, x=x, k=k: fn(x, k), device)
            picks[name] = run()  # warm-up, and the answer to compare
            peaks[name] = peak_growth(run, device)
            times[name] = median_seconds(run, repeats=args.repeats, warmup=0)
        with torch.no_grad():
            prefill = prefill_seconds(lm, lm_head, n, args.prefill_repeats, device)
        same = all(torch.equal(p.sort().values, picks["torch"].sort().values) for p in picks.values())
        cells = " | ".join(f"{times[m] * 1e3:.1f} | {mib(peaks[m])}" for m in backends)
        memory_ratio = f"{peaks['naive'] / peaks['torch']:.0f}x" if peaks["torch"] >= RESOLUTION else "-"
        print(
            f"| {n} | {k} | {cells} | {times['naive'] / times['torch']:.1f}x | "
            f"{memory_ratio} | {prefill * 1e3:.0f} | "
            f"{100 * times['torch'] / prefill:.2f}% |" + ("" if same else "  (selections differ: fp32 near-ties)")
        )


if __name__ == "__main__":
    main()
