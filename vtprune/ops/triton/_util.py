"""Launch helpers shared by the kernel launchers."""

import triton


def pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """Next power of two >= n, clamped to [lo, hi]: Triton block shapes must be powers of two."""
    p = max(lo, triton.next_power_of_2(max(1, n)))
    return p if hi is None else min(p, hi)
