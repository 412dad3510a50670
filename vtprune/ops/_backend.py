"""Backend switch shared by every op."""

BACKENDS = ("auto", "torch")


def check_backend(backend: str) -> str:
    """Resolve ``backend`` to the implementation that will run.

    Only the torch reference exists today, so ``auto`` resolves to it; the switch is part of every
    op's signature so that accelerated kernels can be added without changing callers.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "torch"
