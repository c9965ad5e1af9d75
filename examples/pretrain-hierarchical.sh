#!/usr/bin/env bash
# Pre-train a small Swin and a small ConvNeXt for 32 px images with qtune's recipe (fractals + Fashion-MNIST), so
# that Table 4's rows can be run on hierarchical backbones that have learnt something (random weights starve
# SynQT's queries). Both side paths read a 4x4 map: Swin's third stage (4 blocks, width 128), ConvNeXt's last
# (2 blocks, width 192). Writes runs/pretrained/{swin,convnext}/ in timm's hub layout; then
#   qtune sweep examples/sweep-hierarchical.toml --out runs/swin-pretrained
# Resumable: run it again after an interruption. Needs Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3000}
SWIN='{"architecture": "swin_tiny_patch4_window7_224", "img_size": 32, "patch_size": 2, "embed_dim": 32,
       "depths": [2, 2, 4, 2], "num_heads": [1, 2, 4, 8], "window_size": 4}'
CONVNEXT='{"architecture": "convnext_tiny", "patch_size": 1, "depths": [1, 1, 3, 2], "dims": [24, 48, 96, 192]}'
for kind in swin convnext; do
  model=SWIN; [ "$kind" = convnext ] && model=CONVNEXT
  mkdir -p "runs/pretrained/$kind"
  .venv/bin/python -m qtune.pretrain.train --out "runs/pretrained/$kind/model.safetensors" --steps "$STEPS" \
    --threads 1 --timm-model "${!model}" > "runs/pretrained/$kind.log" 2>&1 &
done
wait
tail -n 4 runs/pretrained/*.log
