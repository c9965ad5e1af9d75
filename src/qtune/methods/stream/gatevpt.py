"""GateVPT: Gated Prompt Tuning (Yoo et al., "Improving Visual Prompt Tuning for Self-supervised Vision
Transformers", ICML 2023, arXiv 2306.05067).

VPT-shallow prompts plus, per block i < G, a learnable gate g_i = sigmoid(gamma_i) (gamma_i starts at -gate_init)
that mixes the block's output for the prompts with its input: g_i * out + (1 - g_i) * in, so the prompts learn
which blocks to interact with; CLS and patches keep the block's output. Every block also divides its attention
logits by a learnable temperature, projected onto [0.01, 10] before each forward as in the authors' code.
With every gate at 1 and every temperature at 1 it is VPT-shallow. Pooling per checkpoint type: ``pool=auto``
follows the backbone (CLS for supervised and MoCo v3), ``pool=mean`` is the authors' choice for MAE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ...backbones import Backbone
from ...errors import ConfigError
from ..registry import register
from ..base import positive
from .vpt import PromptConfig, PromptMethod, replace_prompts

TEMPERATURE_RANGE = (0.01, 10.0)


@dataclass
class GateVPTConfig(PromptConfig):
    gate_init: float = field(default=5.0, metadata={"help": "gate logits start at -gate_init (gates near 0)"})
    gate_blocks: int | None = field(default=None, metadata={
        "help": "gate the prompts after each of the first G blocks (default: all but the last)"})

    def validate(self) -> None:
        super().validate()
        if self.gate_blocks is not None:
            positive("gate_blocks", self.gate_blocks, allow_zero=True)


@register
class GateVPT(PromptMethod):
    name = "gatevpt"
    config_class = GateVPTConfig
    summary = "VPT-shallow prompts with per-block learnable gates and attention temperatures"

    def __init__(self, config: GateVPTConfig, backbone: Backbone, num_classes: int, *, head: bool = True):
        super().__init__(config, backbone, num_classes, head=head)
        gates = backbone.depth - 1 if config.gate_blocks is None else config.gate_blocks
        if gates > backbone.depth:
            raise ConfigError(f"gate_blocks must be in 0..{backbone.depth} for this backbone (got {gates})")
        self.gated = range(self.first, max(self.first, gates))
        # Blocks below the first trainable one have neither gates nor temperatures (they are plain frozen blocks).
        self.gate_logits = (nn.Parameter(torch.full((len(self.gated),), -float(config.gate_init)))
                            if self.gated else None)
        self.temperature = nn.Parameter(torch.ones(len(self.trainable_range)))

    def stream(self, images: torch.Tensor, backbone: Backbone, keep: Sequence[int] = (),
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():  # projected, not clamped in the graph: a clamped value would get no gradient
            self.temperature.clamp_(*TEMPERATURE_RANGE)
        return super().stream(images, backbone, keep)

    def block(self, i: int, x: torch.Tensor, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, p = self.config.tokens, self.prefix
        prompts_in = x[:, p:p + m]
        x, k, v = backbone.block_forward(i, x, temperature=self.temperature[i - self.first])
        if i in self.gated:
            g = self.gate_logits[i - self.first].sigmoid()
            x = replace_prompts(x, g * x[:, p:p + m] + (1 - g) * prompts_in, p)
        return x, k, v
