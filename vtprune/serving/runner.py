"""vLLM's model runners call a model's ``recompute_mrope_positions`` only when the engine was asked for
vLLM's own video pruning (``video_pruning_rate``), and its CPU runner never does. vtprune's M-RoPE
models need that call for images too (``mrope.py``), so the plugin has every runner turn it on for a
model that asks, right after loading it. Private vLLM internals (``load_model``,
``is_multimodal_pruning_enabled``): pinned with the plugin's supported releases."""

from __future__ import annotations

import functools

ASKS = "vtprune_places_tokens"  # a model attribute: True when its embeddings carry grid places to place
_WRAPPED = "_vtprune_wrapped"  # marks a load_model already wrapped in this process


def turn_on_position_recompute() -> None:
    """Wrap ``load_model`` of the runners this platform uses (once per process)."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    for runner in runners:
        original = vars(runner)["load_model"]
        if not getattr(original, _WRAPPED, False):
            runner.load_model = _after_load(original)


def _after_load(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if getattr(self.get_model(), ASKS, False):
            self.is_multimodal_pruning_enabled = True
        return out

    setattr(load_model, _WRAPPED, True)
    return load_model
