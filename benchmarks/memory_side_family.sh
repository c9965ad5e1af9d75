#!/usr/bin/env bash
# The rest of the side-path family in docs/memory.md: Head2Toe, LST, DTL and DTL+ on ViT-B/16 (random weights),
# batch 64, CPU account, one torch thread, live and from a cache (the linear probe, VQT and SynQT rows:
# memory_vitb.sh). The account's "saved for backward" is what benchmarks/saved_bytes.py measures.
set -euo pipefail
out=${1:-benchmarks/results}
qtune memory --backbone vit_base_patch16_224 --threads 1 --device cpu --batch-size 64 --methods head2toe,lst \
    --cached --out "$out/memory_vitb_side_family"
# DTL and DTL+ (their 5 live blocks above M = 7 and the cached X_0 .. X_7)
qtune memory --backbone vit_base_patch16_224 --threads 1 --device cpu --batch-size 64 --methods dtl,dtl_plus \
    --cached --out "$out/memory_vitb_dtl"
