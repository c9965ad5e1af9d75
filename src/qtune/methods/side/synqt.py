"""SynQT: Synthesized Query Tuning (Zhang et al., "Parameter-Efficient and Memory-Efficient Tuning for Vision
Transformer: A Disentangled Approach", arXiv 2407.06964).

A query synthesis module (QSM) writes task-specific queries per block from learnable prompts and the previous
block's knowledge; the frozen blocks act query-only as knowledge extraction modules (KEM, Backbone.query_block);
a conditional head aggregates the 3L+1 extracted features. The stream is never back-propagated through.
Where the authors' code and the paper differ, docs/methods.md says which we follow; parameters the authors create but
never use (per-block pre-norms, an unused aggregation weight) are not created here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from timm.layers import calculate_drop_path_rates

from ...backbones import Backbone, Taps
from ...errors import ConfigError
from ..registry import register
from ..base import Method, MethodConfig, block_count, first_trainable_block, positive, probability
from ..layers import Adapter
from ..masks import Dropout, keep_mask


@dataclass
class SynQTConfig(MethodConfig):
    tokens: int = field(default=4, metadata={"help": "prompt/query tokens per block (n)"})
    bottleneck: int = field(default=48, metadata={"help": "width of the input-projection, QSM-FFN and head adapters"})
    qsm_bottleneck: int = field(default=8, metadata={"help": "width of the QSM attention's q/k/v/out adapters"})
    # Scales default to 0.1, the authors' most frequent per-task setting (methods/presets.py has them all).
    attn_scale: float = field(default=0.1, metadata={"init": True, "help": "initial QSM attention residual scale s'"})
    ffn_scale: float = field(default=0.1, metadata={"init": True, "help": "initial QSM FFN residual scale s''"})
    feat_scale: float = field(default=0.1, metadata={"init": True, "help": "initial scale f of the previous block's knowledge"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in adapters, QSM attention and on queries"})
    drop_feat: float = field(default=0.3, metadata={"help": "per-sample drop rate of whole features (DropFeat)"})
    trainable_blocks: int | None = field(default=None, metadata={
        "help": "queries only in the top K blocks, which alone are traced and cached (default: all)"})
    drop_path: float = field(default=0.0, metadata={
        "help": "training-time stochastic depth of the frozen stream and of the queries' A/M branches, ramped "
                "0 -> this over the blocks as timm's drop_path_rate (the authors' 0.1); > 0 traces live, no cache"})

    def validate(self) -> None:
        block_count("trainable_blocks", self.trainable_blocks)
        positive("tokens", self.tokens)
        positive("bottleneck", self.bottleneck)
        positive("qsm_bottleneck", self.qsm_bottleneck)
        probability("dropout", self.dropout)
        probability("drop_feat", self.drop_feat)
        probability("drop_path", self.drop_path)

    def live_only(self) -> str | None:
        if self.drop_path:
            return (f"drop_path={self.drop_path:g} needs live tracing (stochastic depth changes the frozen stream's "
                    "K/V every step)")
        return None


class QSMAttention(nn.Module):
    """Single-head attention among the n query tokens, with bottleneck adapters as q/k/v/out projections."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.scale = dim**-0.5
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Adapter(dim, hidden) for _ in range(4))
        self.attn_drop = Dropout(dropout)
        self.out_drop = Dropout(dropout)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, n, D)
        kv = self.kv_norm(t)
        q, k, v = self.q_proj(self.q_norm(t)), self.k_proj(kv), self.v_proj(kv)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))  # (B, n, n)
        return self.out_drop(self.out_proj(attn @ v))


class QSMBlock(nn.Module):
    """z + s1 * QSMAttn(LN(z)), then + s2 * Adapter(LN(z)); s1, s2 learnable scalars."""

    def __init__(self, dim: int, cfg: SynQTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QSMAttention(dim, cfg.qsm_bottleneck, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Adapter(dim, cfg.bottleneck, cfg.dropout)
        self.attn_scale = nn.Parameter(torch.tensor(float(cfg.attn_scale)))
        self.ffn_scale = nn.Parameter(torch.tensor(float(cfg.ffn_scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.attn_scale * self.attn(self.norm1(z))
        return z + self.ffn_scale * self.ffn(self.norm2(z))


def drop_features(h: torch.Tensor, p: float) -> torch.Tensor:
    """DropFeat on (B, F, D): each feature after the first, of each sample on its own, is zeroed with probability p
    and otherwise scaled by 1 / (1 - p) (the authors' DropPath on every feature but H_L)."""
    first = torch.ones_like(h[:, :1, :1])
    return h * torch.cat([first, keep_mask(h[:, 1:, :1], 1.0 - p)], dim=1)


class ConditionalHead(nn.Module):
    """Shared projection, DropFeat, aggregation weighted by the first feature, norm, linear classifier."""

    def __init__(self, num_features: int, backbone: Backbone, cfg: SynQTConfig, num_classes: int):
        super().__init__()
        dim = backbone.dim
        self.proj_norm = nn.LayerNorm(dim)
        self.proj = Adapter(dim, cfg.bottleneck, cfg.dropout)
        self.drop_feat = cfg.drop_feat
        self.weight_fc = nn.Linear(dim, num_features - 1)
        self.weight_drop = Dropout(cfg.dropout)
        self.act = nn.GELU()
        # A fresh LayerNorm (PyTorch's eps 1e-5, as the authors build it) starting from the backbone's final norm's
        # weight and bias, then trained: the features live in the stream's scale. A hierarchical backbone's tapped
        # stage has no norm of its width, so there it starts from ones and zeros.
        self.norm = nn.LayerNorm(dim)
        if backbone.feature_norm is not None:
            with torch.no_grad():
                self.norm.weight.copy_(backbone.feature_norm.weight)
                self.norm.bias.copy_(backbone.feature_norm.bias)
        self.fc = nn.Linear(dim, num_classes)  # PyTorch's default init, as timm 0.4's reset_classifier gives them

    def mix(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected features (B, F, D) and their per-sample weights (B, F): 1 for H_L, tanh(...) for the rest."""
        h = feats + self.proj(self.proj_norm(feats))
        if self.training and self.drop_feat > 0:
            h = drop_features(h, self.drop_feat)
        w = torch.tanh(self.weight_drop(self.act(self.weight_fc(h[:, 0]))))  # (B, F-1)
        return h, torch.cat([torch.ones_like(w[:, :1]), w], dim=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, F, D)
        h, w = self.mix(feats)
        return self.fc(self.norm((w.unsqueeze(-1) * h).mean(dim=1)))


@register
class SynQT(Method):
    name = "synqt"
    config_class = SynQTConfig
    summary = "queries synthesised per block from prompts + previous knowledge; frozen blocks extract query-only"

    def __init__(self, config: SynQTConfig, backbone: Backbone, num_classes: int):
        if config.drop_path and backbone.kind != "vit":
            raise ConfigError(f"drop_path={config.drop_path:g} needs a plain ViT's block stream, not backbone "
                              f"{backbone.identity.name!r} ({backbone.kind}); use drop_path=0 there")
        super().__init__(config, backbone, num_classes)
        # Stochastic depth per backbone block, timm's ramp (0 at the first block): the stream's and the queries'.
        self.drop_rates = tuple(calculate_drop_path_rates(config.drop_path, backbone.depth))
        # Memory-constrained variant: the queries (and the K/V read) start at block L - K; T_{L-K} has no previous.
        self.blocks = tuple(range(first_trainable_block(config.trainable_blocks, backbone.depth), backbone.depth))
        depth, dim = len(self.blocks), backbone.dim
        self.prompts = nn.Parameter(torch.empty(depth, config.tokens, dim).uniform_(-1.0, 1.0))
        self.in_proj = nn.ModuleList(Adapter(dim, config.bottleneck, config.dropout) for _ in range(depth))
        self.qsm = nn.ModuleList(QSMBlock(dim, config) for _ in range(depth))
        self.query_drop = Dropout(config.dropout)
        self.feat_scale = nn.Parameter(torch.tensor(float(config.feat_scale))) if depth > 1 else None
        self.head = ConditionalHead(3 * depth + 1, backbone, config, num_classes)

    def blocks_read(self, backbone: Backbone) -> tuple[int, ...]:
        return self.blocks

    def classifier(self) -> nn.Linear:
        return self.head.fc

    def trace(self, backbone: Backbone, images: torch.Tensor) -> Taps:
        # In training with drop_path the queries read K/V of a stream perturbed by stochastic depth, as the authors'
        # model in train mode computes them; in eval mode, the plain stream (what a cache holds).
        if self.training and self.config.drop_path:
            return backbone.trace(images, self.blocks, drop_path=self.drop_rates)
        return super().trace(backbone, images)

    def block_path(self, taps: Taps, backbone: Backbone, j: int,
                   prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The j-th block's side path: queries synthesised from its prompts and ``prev`` (the previous block's
        knowledge H, (B, D)), extracted through the frozen block; returns the token means of A, M and H."""
        p = self.prompts[j].expand(taps.batch_size, -1, -1)  # (B, n, D)
        if prev is not None:
            p = p + self.feat_scale * prev.unsqueeze(1)  # previous block's knowledge, broadcast over n
        t = self.query_drop(self.qsm[j](self.in_proj[j](p)))
        rate = self.drop_rates[self.blocks[j]] if self.training else 0.0  # the block's own rate, as in the stream
        a, m, h = taps.query(backbone, self.blocks[j], t, drop_path=rate)
        return a.mean(dim=1), m.mean(dim=1), h.mean(dim=1)  # token means: D-vectors from here on

    def forward(self, taps: Taps, backbone: Backbone) -> torch.Tensor:
        outs, attns, mlps = [], [], []
        for j in range(len(self.blocks)):
            # One unit per block: streamed taps recompute it in backward instead of keeping its ~20 (B, n, D) tensors.
            a, m, h = taps.run_block(self.block_path, taps, backbone, j, outs[-1] if outs else None)
            attns.append(a)
            mlps.append(m)
            outs.append(h)
        return self.head(torch.stack([outs[-1], *outs, *attns, *mlps], dim=1))
