"""VPT-deep on hierarchical backbones (SynQT paper, Table 4): prompts per window in Swin, prompt pixels in ConvNeXt.

`vpt_deep` builds these on a Swin or ConvNeXt backbone (``VPTDeep.for_backbone``). Only the prompts and the head
train; the frozen timm modules run in eval mode and their weights never change, but the whole stream is
back-propagated through (the prompts enter at the first block).

Swin (VPT's own Swin code, read, not copied): every block of every stage has its own m prompt tokens. In a block,
norm1 is applied to the prompts too; they are prepended to every window's tokens, with zero relative position bias
and no shift mask towards or from them; their attention outputs are averaged over the image's windows, then they take
the block's residuals and MLP like any token. The next block replaces them with its own; the last block's prompt
outputs join the final average pool. VPT's code averages over rows of a window-major view of a batch-major window
layout, which mixes the windows of different images whenever the batch size and window count differ; we average over
each image's own windows.

ConvNeXt ("prompt pixels", VPT's padding of the input with learnable pixels, applied to the feature maps as SynQT's
text says): each stage's feature map is framed by a ring of `width` learnable pixels, each block of the stage has its
own ring (deep: the ring that leaves a block is replaced at the next), the ring is removed before the next stage's
downsampling, and the last stage's ring joins the final average pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from ...backbones import Backbone
from ...errors import ConfigError
from ..base import Method, MethodConfig, positive, probability
from ..layers import vpt_head, vpt_uniform_bound


@dataclass
class StagePromptConfig(MethodConfig):
    tokens: int = field(default=10, metadata={"help": "prompt tokens per block (m)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompts"})

    def validate(self) -> None:
        positive("tokens", self.tokens)
        probability("dropout", self.dropout)


@dataclass
class PromptPixelConfig(StagePromptConfig):
    tokens: int = field(default=1, metadata={"help": "width in pixels of each block's prompt ring"})


class _StagePrompts(Method):
    """Prompt parameters for every block of every stage, the frozen model's own pooling, VPT's head."""

    reads_taps = False
    config_class = StagePromptConfig

    def __init__(self, config: StagePromptConfig, backbone: Backbone, num_classes: int):
        super().__init__(config, backbone, num_classes)
        self.prompt_drop = nn.Dropout(config.dropout)
        info = backbone.model.feature_info  # per stage: width (num_chs) and stride (reduction)
        bound = vpt_uniform_bound(backbone.patch_size, info[0]["num_chs"])  # VPT: one bound, from the first width
        h, w = backbone.preprocessing.input_size
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.empty(len(stage.blocks), *self.shape(
                config, i["num_chs"], (h // i["reduction"], w // i["reduction"]))).uniform_(-bound, bound))
            for stage, i in zip(backbone.stages, info))
        self.head = vpt_head(backbone.pooled_dim, num_classes)

    def shape(self, config: StagePromptConfig, width: int, size: tuple[int, int]) -> tuple[int, ...]:
        """One block's prompts at a stage of this width and feature-map size."""
        raise NotImplementedError

    def classifier(self) -> nn.Linear:
        return self.head


class SwinVPTDeep(_StagePrompts):
    name = "vpt_deep"
    summary = "prompt tokens per block, prepended to every window (VPT on Swin)"

    def shape(self, config, width, size):
        return (config.tokens, width)

    def forward(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        model = backbone.model
        x = model.patch_embed(images)  # (B, H, W, C)
        p = None
        for s, stage in enumerate(backbone.stages):
            x = stage.downsample(x)
            for j, blk in enumerate(stage.blocks):
                own = self.prompt_drop(self.prompts[s][j]).expand(x.shape[0], -1, -1)
                x, p = prompted_swin_block(blk, x, own)
        tokens = torch.cat([p, x.flatten(1, 2)], dim=1)
        return self.head(model.norm(tokens).mean(dim=1))


def prompted_swin_block(blk: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm SwinTransformerBlock with `prompts` (B, m, C) in every window: (X', prompts')."""
    b, h, w, c = x.shape
    m = prompts.shape[1]
    attn = blk.attn
    y = blk.norm1(x)
    shift = tuple(blk.shift_size)
    if any(shift):
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ws = tuple(blk.window_size)
    pad_h, pad_w = (ws[0] - h % ws[0]) % ws[0], (ws[1] - w % ws[1]) % ws[1]
    y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = y.shape[1:3]
    windows = window_partition(y, ws).view(-1, ws[0] * ws[1], c)  # (B * nW, N, C), batch-major
    n_win = windows.shape[0] // b
    seq = torch.cat([blk.norm1(prompts).repeat_interleave(n_win, dim=0), windows], dim=1)  # (B * nW, m + N, C)
    n = seq.shape[1]
    q, k, v = attn.qkv(seq).view(b * n_win, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    bias = torch.zeros(attn.num_heads, n, n, dtype=seq.dtype, device=seq.device)
    bias[:, m:, m:] = attn._get_rel_pos_bias()[0]
    bias = bias.expand(b, n_win, -1, -1, -1)
    mask = blk.get_attn_mask(y) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    if mask is not None:  # shifted windows: tokens from different image regions must not see each other
        bias = bias.clone()
        bias[..., m:, m:] += mask.view(1, n_win, 1, n - m, n - m)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(b * n_win, attn.num_heads, n, n),
                                         scale=attn.scale)
    out = attn.proj(out.transpose(1, 2).reshape(b * n_win, n, -1))
    p = out[:, :m].view(b, n_win, m, c).mean(dim=1)  # each image's own windows
    y = window_reverse(out[:, m:].reshape(-1, ws[0], ws[1], c), ws, hp, wp)[:, :h, :w]
    if any(shift):
        y = torch.roll(y, shifts=shift, dims=(1, 2))
    x = x + blk.drop_path1(y)
    p = prompts + p
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    p = p + blk.mlp(blk.norm2(p))
    return x, p


class ConvNeXtVPTDeep(_StagePrompts):
    name = "vpt_deep"
    config_class = PromptPixelConfig
    summary = "a ring of learnable prompt pixels around every block's feature map (VPT's padding, deep)"

    def shape(self, config, width, size):
        r = config.tokens
        return (width, (size[0] + 2 * r) * (size[1] + 2 * r) - size[0] * size[1])

    def forward(self, images: torch.Tensor, backbone: Backbone) -> torch.Tensor:
        model, r = backbone.model, self.config.tokens
        x = model.stem(images)
        last = (len(backbone.stages) - 1, len(backbone.stages[-1].blocks) - 1)
        for s, stage in enumerate(backbone.stages):
            x = stage.downsample(x)
            for j, blk in enumerate(stage.blocks):
                x = blk(frame(x, self.prompt_drop(self.prompts[s][j]), r))
                if (s, j) != last:  # the next block frames the map with its own ring
                    x = x[..., r:-r, r:-r]
        return self.head(model.forward_head(model.norm_pre(x), pre_logits=True))


def frame(x: torch.Tensor, ring: torch.Tensor, r: int) -> torch.Tensor:
    """x (B, C, H, W) framed by r pixels on each side, whose values are `ring` (C, ring pixels in row-major order)."""
    _, c, h, w = x.shape
    outside = torch.ones(h + 2 * r, w + 2 * r, dtype=torch.bool, device=x.device)
    outside[r:r + h, r:r + w] = False
    ring_map = x.new_zeros(c, outside.numel()).index_copy(1, outside.flatten().nonzero().squeeze(1), ring.to(x.dtype))
    return F.pad(x, (r, r, r, r)) + ring_map.view(1, c, h + 2 * r, w + 2 * r)


def stage_vpt_class(backbone: Backbone) -> type[Method]:
    kinds = {"swin": SwinVPTDeep, "convnext": ConvNeXtVPTDeep}
    if backbone.kind not in kinds:
        raise ConfigError(f"vpt_deep: no prompt design for a {backbone.kind} backbone")
    return kinds[backbone.kind]
