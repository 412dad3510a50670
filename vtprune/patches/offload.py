"""Models whose weights accelerate offloads (``cpu_offload``, ``dispatch_model`` with offloaded modules).

accelerate's hooks load a module's own weights when its ``forward`` runs. ``get_image_features`` is
called outside any forward (by ``generate()`` before prefill, and by vtprune to prune before the
language model), where a module's direct parameters (LLaVA-NeXT's ``image_newline``) are still on the
meta device; the hook's own load and offload steps run around such calls here.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def weights_loaded(module: nn.Module):
    """Within the block, ``module``'s own parameters are on its execution device if accelerate offloads them."""
    hook = getattr(module, "_hf_hook", None)
    offloaded = any(p.device.type == "meta" for p in module.parameters(recurse=False))
    if hook is None or not offloaded:  # not offloaded, or already loaded by an enclosing forward
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)
