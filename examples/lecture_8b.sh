#!/usr/bin/env bash
# The lecture's 8B example from the command line (lecture sections 1, 3 and 6; see docs/cli.md).
# Runs in about a second per command on a CPU; nothing is downloaded or allocated.
set -euo pipefail
CLI=${CLI:-lightning-memopt}

echo "== 1. Model states of plain mixed-precision Adam (PyTorch AMP, no DeepSpeed): the lecture's table"
$CLI estimate 8B --engine torch

echo "== 2. Llama-3-8B on one 80 GiB GPU, micro-batch 1 x 4096 tokens: does it fit?"
$CLI estimate llama-3-8b --engine torch --micro-batch 1 --seq-len 4096 --gpu-memory 80GiB

echo "== 3. The same on 8 GPUs with ZeRO-3 and activation checkpointing"
$CLI estimate llama-3-8b --gpus 8 --zero 3 --checkpointing --micro-batch 1 --seq-len 4096 --gpu-memory 80GiB

echo "== 4. Find the largest micro-batch first, then accumulate to the lecture's 6M-token global batch"
$CLI plan llama-3-8b --gpu-memory 80GiB --gpus 8 --seq-len 4096 --global-batch-tokens 6M

echo "== 5. Part III: the Q8_0 GGUF weights (the lecture's ~8 GB) and a QLoRA fine-tune on one 24 GB GPU"
$CLI estimate llama-3-8b --quantization q8_0 --inference
$CLI estimate llama-3-8b --quantization nf4 --micro-batch 1 --seq-len 2048 --checkpointing --gpu-memory 24GB
