#!/usr/bin/env bash
# SafetyDPO on SD1.5: one LoRA safety expert per category (train_safetydpo.py, the PSA training loop
# with --trainable lora), then one Co-Merge of all experts into a single LoRA (psalign.safetydpo.merge_experts).
#
# Where the numbers come from. The SafetyDPO authors published no per-expert training settings. Their
# repository (github.com/Visualignment/SafetyDPO) has one LoRA Diffusion-DPO launcher,
# launchers/train_lora_sd15.sh with train.py's defaults, not said to be how the experts were trained:
#   taken from it: LoRA rank 4, alpha = rank, on to_q/to_k/to_v/to_out.0; 2000 steps; 4 pairs per GPU
#     x 4 accumulation steps; learning rate 1e-5, constant_with_warmup; beta 5000; a checkpoint every
#     500 steps; 512 px; AdamW, text dropout 0.2 (train.py's defaults, and ours).
#   our choices: 100 warm-up steps (that launcher: 500); bf16 (fp16); the learning rate as given (it
#     adds --scale_lr, multiplying 1e-5 by pairs per GPU x accumulation x GPUs); 1 GPU; and the merge:
#     merged LoRA of the smallest rank within 5% truncation error (merge_report.json states it),
#     calibration prompts from each expert's own captions (nothing published).
# Rerunning resumes each expert from its newest checkpoint. Environment overrides:
#   NUM_GPUS (1; 0: the CPU), COPROV2 (CoProV2 CSV), IMAGE_ROOT (its images; default: the CSV's folder), OUTPUT,
#   CATEGORIES (space-separated; default: the seven of psalign.categories), MODEL, RANK (expert LoRA
#   rank, 4), ALPHA (4), STEPS, BATCH, ACCUM, LR, MIXED_PRECISION (bf16), MERGE_METHOD (co_merge),
#   MERGE_RANK (merged LoRA rank; default: the smallest within merge_experts' --max_truncation_error).
# Extra arguments go to every train_safetydpo.py call, e.g. --sage data/sage/metadata.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"  # the repository: its configs and scripts; relative paths below are the caller's

NUM_GPUS="${NUM_GPUS:-1}"
MODEL="${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
COPROV2="${COPROV2:-data/coprov2/train.csv}"
OUTPUT="${OUTPUT:-outputs/safetydpo_sd15}"
CATEGORIES="${CATEGORIES:-$(python -c "from psalign.categories import CATEGORIES; print(*CATEGORIES)")}"
RESOLUTION="${RESOLUTION:-512}"

experts=()
for category in $CATEGORIES; do
    expert="$OUTPUT/experts/$category"
    python -m psalign.cli.launch --num_gpus "$NUM_GPUS" --accelerate_args "${ACCELERATE_ARGS:-}" "$ROOT/train_safetydpo.py" \
        --category "$category" --coprov2 "$COPROV2" ${IMAGE_ROOT:+--image_root "$IMAGE_ROOT"} \
        --pretrained_model "$MODEL" --output_dir "$expert" --resolution "$RESOLUTION" \
        --lora_rank "${RANK:-4}" --lora_alpha "${ALPHA:-4}" --max_train_steps "${STEPS:-2000}" \
        --train_batch_size "${BATCH:-4}" --gradient_accumulation_steps "${ACCUM:-4}" --learning_rate "${LR:-1e-5}" \
        --lr_scheduler constant_with_warmup --lr_warmup_steps 100 --beta_dpo 5000 \
        --mixed_precision "${MIXED_PRECISION:-bf16}" --checkpointing_steps 500 \
        --resume_from_checkpoint latest "$@"
    experts+=("$expert")
done

python -m psalign.safetydpo.merge_experts --experts "${experts[@]}" --categories $CATEGORIES \
    --pretrained_model "$MODEL" --method "${MERGE_METHOD:-co_merge}" ${MERGE_RANK:+--rank "$MERGE_RANK"} \
    --resolution "$RESOLUTION" --output_dir "$OUTPUT/merged"
