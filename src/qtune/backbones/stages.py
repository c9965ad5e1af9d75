"""Hierarchical timm backbones (Swin, ConvNeXt) seen as the one stage of blocks that side paths read.

SynQT's paper reads the third stage of Swin and the last stage of ConvNeXt ("due to the varying hidden sizes and
number of blocks in different layers"). Such a backbone offers side-path methods the contract of the plain ViT
(``vit.Backbone``): ``depth`` and ``dim`` are the tapped stage's, ``trace`` keeps K/V of its blocks plus the model's
own pooled feature (``pooled_dim`` wide, the last stage's width), and ``query_block`` runs query tokens through one of
its blocks, pure in the frozen weights. docs/methods.md says how each block is queried and why.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..preprocessing import Preprocessing
from .points import Point
from .taps import Taps
from .vit import Backbone, BackboneIdentity, QueryOutput, _drop_path, _heads, _merge, _query_attention


class StageBackbone(Backbone):
    """A frozen hierarchical model; side paths read the blocks of ``stages[stage]``."""

    stage_index: int  # which stage side paths read (negative: from the end)

    def __init__(self, model: nn.Module, identity: BackboneIdentity, preprocessing: Preprocessing):
        nn.Module.__init__(self)
        self.model = model
        self.identity = identity
        self.preprocessing = preprocessing
        self.stage_position = self.stage_index % len(self.stages)  # 0-based, counted from the stem
        self.stage = self.stages[self.stage_position]
        self.requires_grad_(False)
        self.model.eval()

    @property
    def stages(self) -> nn.Sequential:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.stage.blocks)

    @property
    def pooled_dim(self) -> int:
        return self.model.num_features

    @property
    def feature_norm(self) -> nn.Module | None:
        """No norm of the stage's width sits at its output: heads start from a fresh one."""
        return None

    @property
    def num_tokens(self) -> int:
        reduction = self.model.feature_info[self.stage_position]["reduction"]
        return math.prod(side // reduction for side in self.preprocessing.input_size)

    def _plain_vit_only(self, *_args, **_kwargs):
        raise ConfigError(plain_vit_only(self))

    # the ViT stream's entry points: a stream method that reaches them was built for a plain ViT
    embed = block_forward = pool = _plain_vit_only
    final_norm = property(_plain_vit_only)

    def check_points(self, points: Sequence[Point]) -> None:
        if points:
            raise ConfigError(plain_vit_only(self, f"reading block points ({', '.join(p.name for p in points)})"))

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stage_input(self, images: torch.Tensor) -> torch.Tensor:
        """The tapped stage's blocks' input: stem, earlier stages, then the stage's own downsampling."""
        x = self._stem(images)
        for s in self.stages:
            if s is self.stage:
                return s.downsample(x)
            x = s(x)
        raise AssertionError("the tapped stage is one of the model's stages")

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled pre-logits feature from the tapped stage's output: later stages, the model's own head."""
        for s in list(self.stages)[self.stage_position + 1:]:
            x = s(x)
        return self.model.forward_head(self._final(x), pre_logits=True)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _kv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def trace(self, images: torch.Tensor, blocks: Iterable[int] | None = None, points: Sequence[Point] = ()) -> Taps:
        self.check_points(points)
        keep = tuple(range(self.depth)) if blocks is None else tuple(sorted(set(blocks)))
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        x = self.stage_input(images)
        for i, blk in enumerate(self.stage.blocks):
            if i in keep:
                k, v = self._kv(i, x)
                keys.append(k.contiguous())
                values.append(v.contiguous())
            x = blk(x)  # timm's own block: the stream is exactly the model's
        return Taps(keys, values, self.finish(x).clone(), keep)


def plain_vit_only(backbone: Backbone, method: str = "this method") -> str:
    return (f"{method} runs a plain ViT's token stream, not backbone {backbone.identity.name!r} ({backbone.kind}); "
            f"on a hierarchical backbone use linear, vqt, synqt or vpt_deep")


class SwinBackbone(StageBackbone):
    """timm's SwinTransformer; side paths read its third stage (the paper's choice).

    K/V of a block are its qkv of norm1(X) for every token of the feature map. The qkv projection is per token, so the
    window partition and the cyclic shift only reorder these rows; the stream itself runs through timm's block.
    A query token has no place in the window grid, so it attends over all of the block's tokens at once, without the
    relative position bias (defined between window positions) and without the shift mask (defined between windows).
    """

    kind = "swin"
    stage_index = 2

    @property
    def stages(self) -> nn.Sequential:
        return self.model.layers

    @property
    def dim(self) -> int:
        return self.stage.blocks[0].norm1.normalized_shape[0]

    @property
    def num_heads(self) -> int:
        return self.stage.blocks[0].attn.num_heads

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def tap_shape(self) -> dict[str, int]:
        attn = self.stage.blocks[0].attn
        return {"depth": self.depth, "heads": attn.num_heads, "tokens": self.num_tokens,
                "head_dim": attn.qkv.out_features // 3 // attn.num_heads, "dim": self.dim,
                "pooled_dim": self.pooled_dim}

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(images)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def _kv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.stage.blocks[i]
        h = blk.norm1(x).flatten(1, 2)  # (B, H*W, C), row-major over the feature map
        _, k, v = _heads(blk.attn.qkv(h), 3 * blk.attn.num_heads).chunk(3, dim=1)
        return k, v

    def query_block(self, i: int, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    drop_path: float = 0.0) -> QueryOutput:
        blk = self.stage.blocks[i]
        attn = blk.attn
        h = blk.norm1(tokens)
        q_dim = attn.qkv.out_features // 3
        bias = attn.qkv.bias[:q_dim] if attn.qkv.bias is not None else None
        q = _heads(F.linear(h, attn.qkv.weight[:q_dim], bias), attn.num_heads)
        a = _drop_path(attn.proj(_merge(_query_attention(q, k.to(q.dtype), v.to(q.dtype), attn.scale))), drop_path,
                       True)
        e = tokens + a
        m = _drop_path(blk.mlp(blk.norm2(e)), drop_path, True)
        return QueryOutput(a, m, e + m)


class ConvNeXtBackbone(StageBackbone):
    """timm's ConvNeXt; side paths read its last stage (the paper's choice).

    A ConvNeXt block is X + gamma * mlp(norm(dwconv(X))): the depthwise convolution mixes space, norm and MLP mix
    channels per pixel. Its keys and values are the stream's own: V = dwconv(X) at every pixel (what the block's
    norm and MLP read there), K = norm(V). A query token has no neighbourhood for the convolution, so it gathers from
    the whole map instead, A = softmax(norm(T) K^T / sqrt(C)) V, a parameter-free attention; then the block's own
    channel mixing, M = gamma * mlp(norm(A)), and its residual, H = T + M.
    """

    kind = "convnext"
    stage_index = -1

    def __init__(self, model: nn.Module, identity: BackboneIdentity, preprocessing: Preprocessing):
        super().__init__(model, identity, preprocessing)
        blk = self.stage.blocks[0]
        if blk.use_conv_mlp:
            raise ConfigError(f"backbone {identity.name!r}: ConvNeXt blocks with conv_mlp are not supported")

    @property
    def stages(self) -> nn.Sequential:
        return self.model.stages

    @property
    def dim(self) -> int:
        return self.stage.blocks[0].conv_dw.out_channels

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def patch_size(self) -> int:
        return self.model.stem[0].stride[0]

    @property
    def tap_shape(self) -> dict[str, int]:
        return {"depth": self.depth, "heads": 1, "tokens": self.num_tokens, "head_dim": self.dim, "dim": self.dim,
                "pooled_dim": self.pooled_dim}

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.stem(images)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(x)

    def _kv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.stage.blocks[i]
        v = blk.conv_dw(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        return blk.norm(v).unsqueeze(1), v.unsqueeze(1)  # one "head" of width C

    def query_block(self, i: int, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    drop_path: float = 0.0) -> QueryOutput:
        blk = self.stage.blocks[i]
        q = blk.norm(tokens).unsqueeze(1)  # (B, 1, n, C)
        a = _query_attention(q, k.to(q.dtype), v.to(q.dtype), q.shape[-1] ** -0.5).squeeze(1)
        m = blk.mlp(blk.norm(a))
        if blk.gamma is not None:
            m = m * blk.gamma
        m = _drop_path(m, drop_path, True)
        return QueryOutput(a, m, tokens + m)


def stage_backbone_class(model: nn.Module) -> type[StageBackbone] | None:
    """The wrapper for a hierarchical timm model, or None for a plain ViT."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        return SwinBackbone
    if isinstance(model, ConvNeXt):
        return ConvNeXtBackbone
    return None
