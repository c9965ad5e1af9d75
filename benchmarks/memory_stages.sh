#!/usr/bin/env bash
# Table 4's backbones in docs/memory.md: Swin-B and ConvNeXt-B (random weights), batch 64, CPU account, one thread.
# Training memory of linear, VPT-deep, SynQT and VQT, live and from a cache.
set -euo pipefail
out=${1:-benchmarks/results}
for backbone in swin_base_patch4_window7_224 convnext_base; do
    qtune memory --backbone "$backbone" --threads 1 --device cpu --batch-size 64 --methods linear,vpt_deep,synqt,vqt \
        --cached --out "$out/memory_${backbone%%_*}_training"
done
