"""A frozen timm VisionTransformer seen as a stream of blocks: ``trace`` reads it, ``query_block`` queries it.

We consume timm's model contract and never fork its block code; the two pure functions below re-use each block's
own sub-modules (norm1, attn.qkv, q_norm/k_norm, proj, ls1, norm2, mlp, ls2), so any pre-norm timm ViT works:
supervised, MAE, DINO, MoCo v3, CLIP, and LayerScale / qk-norm variants.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.layers import drop_path as _drop_path
from torch import nn

from ..errors import ConfigError
from ..preprocessing import Preprocessing
from .points import Point
from .taps import Taps

_BLOCK_PARTS = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
_ATTN_PARTS = ("qkv", "proj", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


class QueryOutput(NamedTuple):
    """What query tokens give in one frozen block (docs/methods.md, KEM): A_i, M_i and H_i = T_i + A_i + M_i."""

    attn: torch.Tensor
    mlp: torch.Tensor
    out: torch.Tensor


@dataclass(frozen=True)
class BackboneIdentity:
    """What a checkpoint records about the backbone it was trained on."""

    name: str
    weights_hash: str
    model_args: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash, "model_args": self.model_args}


def identity_difference(recorded: dict[str, Any], now: dict[str, Any], where: str) -> str | None:
    """How the backbone recorded ``where`` (e.g. "in the cache") differs from the one ``now``, in words; None if the
    same. The one comparison of backbone identities (name, weights hash, model arguments) that caches and
    checkpoints make."""
    if recorded["name"] != now["name"]:
        return f"backbone {recorded['name']} {where}, not {now['name']}"
    if recorded["weights_hash"] != now["weights_hash"]:
        return (f"backbone weights changed (hash {recorded['weights_hash'][:12]} {where}, "
                f"{now['weights_hash'][:12]} now)")
    if json.dumps(recorded.get("model_args", {}), sort_keys=True) != json.dumps(now.get("model_args", {}),
                                                                                sort_keys=True):
        return f"backbone arguments {recorded.get('model_args')} {where}, {now.get('model_args')} now"
    return None


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, num_heads, -1).transpose(1, 2)  # (B, H, N, hd)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)  # (B, N, H*hd)


class _QueryAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for a few query tokens over frozen K/V: backward gives q's gradient only, keeping
    just the (B, H, n, N) weights. Under vmap over a stack of models sharing the K/V (``engine.many``), the models'
    queries become extra query tokens of one product instead of G copies of the K/V."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return p @ v, p

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, k, v, scale = inputs
        ctx.save_for_backward(k, v, output[1])
        ctx.scale = scale
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_p: torch.Tensor):
        k, v, p = ctx.saved_tensors
        dp = grad_out @ v.transpose(-2, -1)
        return (p * (dp - (dp * p).sum(-1, keepdim=True)) @ k) * ctx.scale, None, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, scale):
        qd, kd, vd, _ = in_dims
        g = info.batch_size
        if kd is None and vd is None:  # shared K/V: (G, B, H, n, hd) queries -> (B, H, G*n, hd)
            q = q.movedim(qd, 0) if qd is not None else q.expand(g, *q.shape)
            _, b, h, n, hd = q.shape
            o, p = _QueryAttention.apply(q.permute(1, 2, 0, 3, 4).reshape(b, h, g * n, hd), k, v, scale)
            return ((o.reshape(b, h, g, n, -1).permute(2, 0, 1, 3, 4), p.reshape(b, h, g, n, -1).permute(2, 0, 1, 3, 4)),
                    (0, 0))
        q, k, v = (t.movedim(d, 0) if d is not None else t.expand(g, *t.shape) for t, d in zip((q, k, v), in_dims))
        return _QueryAttention.apply(q, k, v, scale), (0, 0)


def _query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of a few query tokens over the stream's K/V. On CPU, SDPA's backward also computes the gradients of
    K and V, which a frozen stream never needs; the explicit product is then 2-3x faster for a few queries (measured
    on ViT-Ti: 1-16 queries over 197 tokens) and keeps only the (B, H, n, N) weights for backward."""
    if q.device.type == "cpu" and not (k.requires_grad or v.requires_grad):
        return _QueryAttention.apply(q, k, v, scale)[0]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _attn_out(attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Heads merged -> (scale norm) -> (gate) -> proj, as in timm's Attention."""
    x = attn.norm(_merge(o)) if hasattr(attn, "norm") else _merge(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(h).sigmoid()
    return attn.proj(x)


class Backbone(nn.Module):
    """A frozen timm VisionTransformer plus its identity and preprocessing.

    Frozen means: no parameter requires grad, the model stays in eval mode (no dropout, no stochastic depth unless
    a trace asks for it), and ``trace`` runs without autograd, so nothing of the stream is kept for backward.
    """

    kind = "vit"  # hierarchical backbones (stages.py) say which they are

    def __init__(self, model: nn.Module, identity: BackboneIdentity, preprocessing: Preprocessing):
        super().__init__()
        for i, blk in enumerate(getattr(model, "blocks", ())):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)] + [
                f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(blk, "attn", None), p)]
            if missing:
                raise ConfigError(f"backbone {identity.name!r}: block {i} ({type(blk).__name__}) is not a pre-norm "
                                  f"timm ViT block (lacks {', '.join(missing)})")
        if not hasattr(model, "blocks") or len(model.blocks) == 0:
            raise ConfigError(f"backbone {identity.name!r}: not a timm VisionTransformer (no blocks)")
        self.model = model
        self.identity = identity
        self.preprocessing = preprocessing
        self.requires_grad_(False)
        self.model.eval()

    # -- shape facts, taken from the model, never hard-coded --
    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_heads(self) -> int:
        return self.model.blocks[0].attn.num_heads

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def num_tokens(self) -> int:
        return self.model.patch_embed.num_patches + self.model.num_prefix_tokens

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled feature (the block width here; a hierarchical model's last stage is wider)."""
        return self.dim

    @property
    def final_norm(self) -> nn.Module:
        """The norm whose output the pooled feature comes from (fc_norm when the model pools by averaging)."""
        return self.model.fc_norm if not isinstance(self.model.fc_norm, nn.Identity) else self.model.norm

    @property
    def feature_norm(self) -> nn.Module | None:
        """A norm of the block width that heads over block features may start from (None: start fresh)."""
        return self.final_norm

    @property
    def tap_shape(self) -> dict[str, int]:
        """What one block's K/V look like: (heads, tokens, head_dim) per sample, and the widths."""
        return {"depth": self.depth, "heads": self.num_heads, "tokens": self.num_tokens,
                "head_dim": self.model.blocks[0].attn.head_dim, "dim": self.dim}

    def train(self, mode: bool = True) -> "Backbone":
        """Stay in eval mode: the frozen stream is deterministic (required for caching)."""
        return super().train(False)

    # -- the frozen stream --
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """X_0: patch embedding, prefix tokens, position embedding, pre-norm."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def block_forward(self, i: int, x: torch.Tensor, temperature: torch.Tensor | float | None = None,
                      parts: dict[str, torch.Tensor] | None = None, drop_path: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X_i from X_{i-1} through block i, also returning its K_i, V_i (B, H, N, hd).

        ``temperature`` (GateVPT) divides the block's attention logits; it is applied to q, so it may be a
        learnable tensor (the fused attention kernel takes only a float scale). ``parts``, if given, receives the
        block's points (``points.POINTS``) per token; the stream is the same either way. ``drop_path`` > 0 drops
        each residual branch per sample with that probability, as timm's block does in training (stochastic depth).
        """
        blk = self.model.blocks[i]
        attn = blk.attn
        x_in = x
        h = blk.norm1(x)
        q, k, v = _heads(attn.qkv(h), 3 * attn.num_heads).chunk(3, dim=1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if temperature is not None:
            q = q / temperature
        a = _drop_path(blk.ls1(_attn_out(attn, F.scaled_dot_product_attention(q, k, v, scale=attn.scale), h)),
                       drop_path, True)
        x = x + a
        if parts is None:
            return x + _drop_path(blk.ls2(blk.mlp(blk.norm2(x))), drop_path, True), k, v
        mlp = blk.mlp  # timm's Mlp, step by step to expose its hidden activation
        hidden = mlp.act(mlp.fc1(blk.norm2(x)))
        m = _drop_path(blk.ls2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))), drop_path, True)
        x = x + m
        parts.update(input=x_in, x=x, pre_attn=h, attn=a, mlp_hidden=hidden, mlp_out=m)
        return x, k, v

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature through timm's own forward, with autograd where parameters train (stream methods)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pre-logits feature from X_L: final norm, then CLS or mean pooling (timm's forward_head)."""
        return self.model.forward_head(self.model.norm(x), pre_logits=True)

    @torch.no_grad()
    def trace(self, images: torch.Tensor, blocks: Iterable[int] | None = None, points: Sequence[Point] = (),
              drop_path: Sequence[float] | None = None) -> Taps:
        """Run the frozen stream once, keeping K/V of ``blocks`` (default: all), the pooled feature and ``points``.

        ``drop_path``, one rate per block, runs the stream with stochastic depth as timm trains it (SynQT's
        ``drop_path``): the taps then differ every call, so only a live trace gives them.
        """
        keep = tuple(range(self.depth)) if blocks is None else tuple(sorted(set(blocks)))
        self.check_points(points)
        rates = [0.0] * self.depth if drop_path is None else list(drop_path)
        if len(rates) != self.depth:
            raise ConfigError(f"drop_path: {len(rates)} rates for a {self.depth}-block backbone")
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        read: dict[Point, list[torch.Tensor]] = {p: [] for p in points}
        x = self.embed(images)
        for i in range(self.depth):
            parts: dict[str, torch.Tensor] | None = {} if any(i in p.blocks for p in points) else None
            x, k, v = self.block_forward(i, x, parts=parts, drop_path=rates[i])
            if i in keep:  # compact copies, so the block's q and qkv buffers are not kept alive by views
                keys.append(k.contiguous())
                values.append(v.contiguous())
            for p in points:
                if i in p.blocks:
                    read[p].append(p.pool_tokens(parts[p.name]).contiguous())
        return Taps(keys, values, self.pool(x).clone(), keep, read)

    def check_points(self, points: Sequence[Point]) -> None:
        """Points are read from blocks that exist, and the MLP's hidden activation from timm's plain Mlp."""
        for p in points:
            if p.blocks and not 0 <= p.blocks[0] <= p.blocks[-1] < self.depth:
                raise ConfigError(f"point {p.name}: blocks {list(p.blocks)} outside 0..{self.depth - 1}")
        mlp = self.model.blocks[0].mlp
        if points and not all(hasattr(mlp, a) for a in ("fc1", "act", "drop1", "norm", "fc2", "drop2")):
            raise ConfigError(f"backbone {self.identity.name!r}: block points need timm's Mlp (fc1, act, fc2), "
                              f"not {type(mlp).__name__}")

    def point_shape(self, p: Point) -> tuple[int, ...]:
        """One sample's tensor of point ``p`` in one block: (tokens, channels), or (numbers,) once pooled."""
        channels = self.model.blocks[0].mlp.fc1.out_features if p.name == "mlp_hidden" else self.dim
        return (p.width(self.num_tokens, channels),) if p.pool else (self.num_tokens, channels)

    def query_block(self, i: int, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    drop_path: float = 0.0) -> QueryOutput:
        """Query tokens (B, n, D) through frozen block i, attending over its K_i, V_i only.

        Queries neither see each other nor change the stream. Pure in the frozen weights: gradients flow to
        ``tokens`` only. Half-precision K/V (from a cache) are promoted to the tokens' dtype. ``drop_path`` > 0
        drops A and M per sample (all n tokens together), as timm's block drops its residual branches in training.
        """
        blk = self.model.blocks[i]
        attn = blk.attn
        h = blk.norm1(tokens)
        q_dim = attn.num_heads * attn.head_dim
        bias = attn.qkv.bias[:q_dim] if attn.qkv.bias is not None else None
        q = attn.q_norm(_heads(F.linear(h, attn.qkv.weight[:q_dim], bias), attn.num_heads))
        o = _query_attention(q, k.to(q.dtype), v.to(q.dtype), attn.scale)
        a = _drop_path(blk.ls1(_attn_out(attn, o, h)), drop_path, True)
        e = tokens + a
        m = _drop_path(blk.ls2(blk.mlp(blk.norm2(e))), drop_path, True)
        return QueryOutput(a, m, e + m)

    def kv_bytes_per_sample(self, blocks: Sequence[int] | None = None, bytes_per_value: int = 2) -> int:
        """Size of one sample's K/V for ``blocks`` (default all), at ``bytes_per_value``."""
        shape = self.tap_shape
        n_blocks = self.depth if blocks is None else len(blocks)
        return 2 * n_blocks * shape["tokens"] * shape["heads"] * shape["head_dim"] * bytes_per_value
