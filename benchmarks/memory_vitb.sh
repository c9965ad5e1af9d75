#!/usr/bin/env bash
# The figures in docs/memory.md: ViT-B/16 (random weights), batch 64, CPU account, one torch thread.
# Training memory per method (with cached SynQT/VQT runs), then inference cost, then fitting a 3 GB budget.
set -euo pipefail
out=${1:-benchmarks/results}
methods=linear,full,bitfit,vpt_deep,vqt,synqt
common=(--backbone vit_base_patch16_224 --threads 1 --device cpu)
qtune memory "${common[@]}" --batch-size 64 --methods "$methods" --cached --out "$out/memory_vitb_training"
qtune memory "${common[@]}" --batch-size 64 --methods "$methods" --no-training --inference \
    --inference-batch-size 8 --out "$out/memory_vitb_inference"
qtune memory "${common[@]}" --batch-size 64 --methods full,vpt_deep,bitfit,synqt,vqt --no-training \
    --memory-budget 3GB --max-tokens 16 --out "$out/memory_vitb_budget_3GB"
