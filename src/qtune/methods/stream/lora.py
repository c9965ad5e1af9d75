"""LoRA: low-rank weight updates (Hu et al., ICLR 2022, arXiv 2106.09685), injected with HF PEFT.

W x + (alpha / r) B A dropout(x) on each block's attention qkv Linear, optionally on the MLP's Linears too;
B starts at zero, so the model starts as the backbone. PEFT's layers wrap the timm Linears (``base_layer``) and
are swapped in on their parents; we choose the targets by module type inside the trainable blocks and hand PEFT
their exact names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...backbones import Backbone
from ..registry import register
from ..base import positive, probability
from .core import StreamConfig, StreamMethod


@dataclass
class LoRAConfig(StreamConfig):
    rank: int = field(default=8, metadata={"help": "rank r of the update"})
    alpha: float = field(default=8.0, metadata={"help": "scaling numerator: the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the update's input"})
    mlp: bool = field(default=False, metadata={"help": "also adapt the MLP's Linear layers"})

    def validate(self) -> None:
        super().validate()
        positive("rank", self.rank)
        positive("alpha", self.alpha)
        probability("dropout", self.dropout)


@register
class LoRA(StreamMethod):
    name = "lora"
    config_class = LoRAConfig
    summary = "low-rank updates of the attention qkv (optionally MLP) weights, through HF PEFT"

    def targets(self, backbone: Backbone) -> list[str]:
        """Qualified names (in the timm model) of the Linears to adapt: chosen by type, in the trainable blocks."""
        names = {id(m): n for n, m in backbone.model.named_modules()}
        chosen: list[nn.Module] = []
        for i in self.trainable_range:
            blk = backbone.model.blocks[i]
            chosen.append(blk.attn.qkv)
            if self.config.mlp:
                chosen += [m for m in blk.mlp.modules() if isinstance(m, nn.Linear)]
        return [names[id(m)] for m in chosen if isinstance(m, nn.Linear)]

    def inject(self, backbone: Backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # heavy import: only when LoRA is used
        from peft.tuners.lora import LoraLayer

        cfg = self.config
        peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=self.targets(backbone), bias="none")
        inject_adapter_in_model(peft_cfg, backbone.model)
        self.wrapped = [m.lora_dropout for m in backbone.model.modules() if isinstance(m, LoraLayer)]
