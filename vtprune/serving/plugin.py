"""The vLLM plugin (entry point ``vtprune = vtprune.serving.plugin:register`` in the group
``vllm.general_plugins``, loaded by every vLLM process): vtprune's model classes replace vLLM's for
the architectures below. With no ``vtprune`` options in ``hf_overrides`` they are vLLM's own."""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32.",)  # the vLLM releases whose private classes this plugin is built and tested on

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vtprune.serving.llava:PrunedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vtprune.serving.llava_next:PrunedLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vtprune.serving.qwen2_vl:PrunedQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.serving.qwen2_vl:PrunedQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    import vllm
    from vllm import ModelRegistry

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vtprune's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; this is vLLM "
            f"{vllm.__version__}: install a supported release, or uninstall vtprune's plugin (pip uninstall vtprune)"
        )
    for architecture, model in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model)
    from vtprune.serving.runner import turn_on_position_recompute

    turn_on_position_recompute()
