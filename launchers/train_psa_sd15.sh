#!/usr/bin/env bash
# PSA adapter on SD1.5 with the published recipe of configs/sd15.yaml (4 GPUs x 6 pairs x 8 accumulation = 192 pairs per step,
# bf16, lr 5e-6 constant after 500 warm-up steps, 5000 steps, beta 5000, a checkpoint every 500 steps).
# Rerunning resumes from the newest checkpoint. Environment overrides:
#   NUM_GPUS (4; 0 trains on the CPU, and a count above the GPUs present is refused), DATA (metadata.jsonl or its folder), EMBEDS, OUTPUT; and, over the config file,
#   MODEL, BATCH (per GPU), ACCUM, MIXED_PRECISION. Extra arguments go to train_psa.py, e.g.
#   NUM_GPUS=8 ACCUM=4 DATA=/data/sage EMBEDS=/data/embeds bash launchers/train_psa_sd15.sh --precompute
# Multi-node: `accelerate config`, or ACCELERATE_ARGS="--config_file my_accelerate.yaml" (DDP; DeepSpeed and FSDP are refused).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # the repository: its configs and scripts; relative paths below are the caller's

NUM_GPUS="${NUM_GPUS:-4}"
DATA="${DATA:-data/sage}"
EMBEDS="${EMBEDS:-data/embeds}"
OUTPUT="${OUTPUT:-outputs/psa_sd15}"

exec python -m psalign.cli.launch --num_gpus "$NUM_GPUS" --accelerate_args "${ACCELERATE_ARGS:-}" "$ROOT/train_psa.py" --config "$ROOT/configs/sd15.yaml" \
    --train_data "$DATA" --embeds_folder "$EMBEDS" --output_dir "$OUTPUT" \
    ${MODEL:+--pretrained_model "$MODEL"} ${BATCH:+--train_batch_size "$BATCH"} \
    ${ACCUM:+--gradient_accumulation_steps "$ACCUM"} ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} \
    --resume_from_checkpoint latest "$@"
