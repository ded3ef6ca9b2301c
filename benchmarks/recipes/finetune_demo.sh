#!/usr/bin/env bash
# Issue 5's demonstration: dense -> MSA conversion that keeps long-context retrieval.
#
#   The task: key->value pairs hidden in random filler, each stored as one token naming its key
#   and value (--fused-pairs), queried at the end ([QUERY, key] -> value). The two-token pair
#   format needs an induction circuit that small models form only after a long plateau
#   (benchmarks/NOTES.md: even a minimal 2-layer transformer stays at chance on content-based
#   copying for 3,000 steps); with fused pairs the lookup is one attention step.
#   A1 dense from scratch at 256 tokens (16 pairs, 16 queries)
#   A2 dense at 1K (continues A1's weights)
#   B  dense at 8K context (continues A2's weights)
#   C  conversion, stage 1: index projections (one 128-dim index head per group, M3's size)
#      added to every layer and trained alone (backbone frozen) on the KL to the main branch's
#      attention over the whole causal context while attention stays dense (paper §7.3
#      stage 1; 400 steps: the KL and the recall plateau by step ~300)
#   D  conversion, stage 2: the whole model trained with MSA (k*Bk = 8*128 = 1024 tokens =
#      1/8 of the context), the LM loss plus the KL over the selected blocks (0.18 s/step at
#      8K x 8 on the H200)
#   E  held-out evaluation at 8K: dense, MSA after conversion, MSA with a random indexer;
#      block and score recall of the indexer against the main branch's own top-k blocks
#
# Every stage is resumable (Orbax checkpoints in its folder): rerun the same command and
# finished stages are skipped, an interrupted one continues (--resume). STAGE_MINUTES bounds
# each invocation of a stage, so a piece of work fits a short GPU lease.
# Usage: benchmarks/recipes/finetune_demo.sh RUNS_DIR   (env: STAGE_MINUTES, STEPS_A1, STEPS_A2, STEPS_B,
#        STEPS_C, STEPS_D, EVAL_EXAMPLES, EXTRA: extra flags for every finetune.py call, STOP_AFTER: a
#        stage name to stop after, e.g. b_dense_8k for the dense model alone)
set -uo pipefail
runs=${1:?usage: finetune_demo.sh RUNS_DIR}
mkdir -p "$runs"
minutes=${STAGE_MINUTES:-8}
model="--num-layers 4 --hidden-size 256 --num-heads 4 --num-kv-heads 2 --head-dim 64
  --rotary-dim 32 --index-head-dim 64 --vocab-size 2048 --moe-layers none --mlp-dim 1024"
common="--dtype bfloat16 --param-dtype bfloat16 --quiet --save-every 250 --keep 1
  --time-limit $minutes --resume ${EXTRA:-}"
long="--seq-len 8192 --num-pairs 64 --num-queries 32 --fused-pairs --batch-size 8"

stage() {  # name, then finetune.py flags; returns 1 when the stage is not finished yet
  local name=$1; shift
  if [ -d "$runs/$name/model" ]; then echo "$name: done"; stop_after "$name"; return 0; fi
  echo "$name: training"
  python3 scripts/finetune.py --output-dir "$runs/$name" $common "$@" \
      > "$runs/$name.log" 2>&1
  local rc=$?
  tail -1 "$runs/$name.log"
  if [ $rc -ne 0 ]; then echo "$name failed (rc=$rc): $runs/$name.log"; return 1; fi
  [ -d "$runs/$name/model" ] || { echo "$name: not finished; rerun to continue"; return 1; }
  stop_after "$name"
}
stop_after() {
  if [ "${STOP_AFTER:-}" = "$1" ]; then echo "stopping after $1 (STOP_AFTER)"; exit 0; fi
}

stage a1_dense_256 $model --sparse-layers none --attention dense --kl-weight 0 \
    --dense-implementation cudnn --seq-len 256 --num-pairs 16 --num-queries 16 --fused-pairs \
    --batch-size 64 --steps "${STEPS_A1:-1000}" --lr 2e-3 --lr-warmup-steps 100 \
    --eval-every 250 --eval-examples 256 || exit 1
stage a2_dense_1k --init-from "$runs/a1_dense_256" --sparse-layers none --attention dense \
    --kl-weight 0 --dense-implementation cudnn --seq-len 1024 --num-pairs 32 \
    --num-queries 32 --fused-pairs --batch-size 32 --steps "${STEPS_A2:-500}" --lr 1e-3 \
    --lr-warmup-steps 50 --eval-every 250 --eval-examples 128 || exit 1
stage b_dense_8k --init-from "$runs/a2_dense_1k" --sparse-layers none --attention dense \
    --kl-weight 0 --dense-implementation cudnn $long --steps "${STEPS_B:-1000}" --lr 5e-4 \
    --lr-warmup-steps 50 --eval-every 250 --eval-examples 32 || exit 1
stage c_msa_8k --init-from "$runs/b_dense_8k" --index-head-dim 128 --sparse-layers all \
    --block-size 128 --topk 8 --dense-implementation cudnn $long --mode indexer-only \
    --dense-warmup-steps "${STEPS_C:-400}" --steps "${STEPS_C:-400}" --lr 1e-3 \
    --lr-warmup-steps 50 || exit 1
stage d_msa_8k --init-from "$runs/c_msa_8k" --sparse-layers all --block-size 128 --topk 8 \
    --dense-implementation cudnn $long --mode full --attention msa --steps "${STEPS_D:-500}" \
    --lr 1e-4 --lr-warmup-steps 20 --eval-every 250 --eval-examples 16 || exit 1

# E: the same held-out examples for every variant (evaluate.py's eval split)
for name in b_dense_8k d_msa_8k; do
  [ -f "$runs/eval_$name.json" ] && continue
  variants=dense; [ $name = d_msa_8k ] && variants="dense msa msa-random-indexer"
  python3 scripts/evaluate.py --checkpoint "$runs/$name" --seq-len 8192 --num-pairs 64 \
      --num-queries 32 --fused-pairs --attention $variants \
      --num-examples "${EVAL_EXAMPLES:-128}" --dtype bfloat16 --dense-implementation cudnn --quiet \
      --output-json "$runs/eval_$name.json" > "$runs/eval_$name.log" 2>&1 \
    || { echo "eval $name failed: $runs/eval_$name.log"; exit 1; }
  tail -5 "$runs/eval_$name.log"
done
