"""timm's ``VisionTransformer`` family (ViT, DeiT, with CLS, distillation and register tokens) under a
tower-stage pruner, for image classification: ``vtprune.apply(vit, vtprune.ToMe(keep=0.5))``.

Each block's ``forward`` is shadowed for the duration (``MethodPatch``; ``state_dict`` and the classes
are untouched): the block runs its own sub-modules in timm's order, passing the proportional-attention
term as the additive ``attn_mask`` timm's ``Attention`` takes (its fused SDPA and its eager path both
add it), and merges after the attention residual. The keys are read by a forward hook on the
attention's ``qkv`` projection, without changing its output. Pruners that merge a block's output
(MustDrop) merge after the MLP residual instead, comparing the hidden states. ``forward_features`` scopes one tower
forward (per thread) and records ``handle.last``. Pooling after the blocks is timm's own (``avg``: a
plain mean over the remaining tokens, as in ToMe's timm patch).
"""

from __future__ import annotations

import functools

from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.tower_stage import TowerStage
from vtprune.pruners.base import TowerPruner
from vtprune.pruners.pipeline import as_pipeline

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class TimmViTAdapter:
    @classmethod
    def supports(cls, model) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def __init__(self, model):
        self.model = model
        self.last = None
        self._runs = PerThread()

    @property
    def protected(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    def check(self, config) -> None:
        pipeline = as_pipeline(config)
        pruners = pipeline.pruners
        if len(pruners) != 1 or not isinstance(pruners[0], TowerPruner):
            names = [p.name for p in pruners]
            raise ValueError(
                f"a timm {type(self.model).__name__} takes one tower-stage pruner (such as vtprune.ToMe), got "
                f"{names}: the other stages act on a language model's visual tokens"
            )
        for index, block in enumerate(self.model.blocks):
            missing = [part for part in BLOCK_PARTS if not hasattr(block, part)]
            if missing or not hasattr(block.attn, "qkv") or not hasattr(block.attn, "num_heads"):
                raise ValueError(
                    f"block {index} ({type(block).__name__}) is not a timm Block with a fused qkv attention "
                    f"(missing {missing or ['attn.qkv']}); vtprune cannot merge tokens inside it"
                )
        if getattr(self.model, "global_pool", None) == "map":
            raise ValueError("attention-pool heads (global_pool='map') are not supported with token merging yet")
        pruners[0].merge_plan(self.patches, self.protected, len(self.model.blocks))  # keep reachable?

    def install(self, config) -> list:
        self._stage = TowerStage(as_pipeline(config).pruners[0], len(self.model.blocks), self.protected)
        undo = []
        try:
            undo.append(MethodPatch(self.model, "forward_features", self._forward_features).undo)
            for index, block in enumerate(self.model.blocks):
                undo.append(MethodPatch(block, "forward", functools.partial(self._block_forward, index)).undo)
                hook = block.attn.qkv.register_forward_hook(functools.partial(self._read_keys, block.attn))
                undo.append(hook.remove)
        except Exception:
            for step in reversed(undo):
                step()
            raise
        return undo

    def _forward_features(self, original, *args, **kwargs):
        with self._runs.set(self._stage.start(self.patches)) as run:
            out = original(*args, **kwargs)
            if run.origin is not None:
                self.last = self._stage.stats(run)
        return out

    def _read_keys(self, attn, _module, _inputs, qkv):
        run = self._runs.get()
        if run is None:
            return
        batch, n = qkv.shape[:2]
        q, k = qkv.reshape(batch, n, 3, attn.num_heads, -1)[:, :, :2].permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
        keys = attn.k_norm(k)
        run.metric = keys.mean(1)  # ToMe's metric: keys averaged over heads
        if self._stage.pruner.reads_attention:  # the probabilities timm's fused attention never forms
            run.attention = ((attn.q_norm(q) * attn.scale) @ keys.transpose(-2, -1)).float().softmax(-1)

    def _block_forward(self, index, original, x, attn_mask=None, is_causal=False):
        run = self._runs.get()
        if run is None:  # a block called outside forward_features: as unpatched
            return original(x, attn_mask=attn_mask, is_causal=is_causal)
        block, stage = self.model.blocks[index], self._stage
        stage.enter(run, x)
        bias = stage.attention_bias(run, x.dtype)
        mask = bias if attn_mask is None else attn_mask if bias is None else attn_mask + bias
        causal = {"is_causal": True} if is_causal else {}  # older timm attention takes no is_causal
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask, **causal)))
        if stage.pruner.merges_after == "attention":
            x = stage.merge(run, index, x, run.metric)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return stage.merge(run, index, x, x) if stage.pruner.merges_after == "block" else x
