#!/usr/bin/env bash
# scripts/generate.py on GPUs against the CPU xla path, on a ~1B-parameter random checkpoint in
# the released layout (models/configs/gen_1b.json, ~2 GB bf16) with prompts longer than k*Bk = 2048
# tokens, so MSA selection is active. Greedy float32 tokens must agree across: 1 GPU (Pallas
# GPU kernels), 2 GPUs tensor-parallel, 2 GPUs expert-parallel (when 2 GPUs are present), and
# the CPU xla path. SERVE_BATCH=N adds a continuous-batching run on 1 GPU (the prompts as a
# queue of requests over N rows of a paged cache of SERVE_PAGES pages; its tokens must equal the
# static batch's). Usage: benchmarks/recipes/generate_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: generate_check.sh OUT_DIR}
mkdir -p "$out"
config=${CONFIG:-models/configs/gen_1b.json}
ckpt=${CKPT:-/tmp/gen_1b}
new=${NEW_TOKENS:-16}
lengths=${LENGTHS:-3000 2300}
[ -f "$ckpt/config.json" ] || python3 scripts/make_tiny_checkpoint.py --output-dir "$ckpt" \
    --config "$config" --shards 4 --dtype bfloat16 || exit 1
prompts=$(python3 -c "
import json, random, sys
vocab = json.load(open(sys.argv[1]))['vocab_size']
r = random.Random(0)
for n in sys.argv[2:]:
  print('--prompt-ids', ','.join(str(r.randrange(1, vocab)) for _ in range(int(n))))" \
  "$config" $lengths)
run() {  # name, then extra arguments
  local name=$1; shift
  python3 scripts/generate.py --checkpoint "$ckpt" $prompts \
      --max-new-tokens "$new" --dtype float32 --warmup --quiet \
      --output-json "$out/$name.json" "$@" > "$out/$name.log" 2> "$out/$name.err"
  echo "$name rc=$? $(tail -1 "$out/$name.log")"
}
ngpu=$(python3 -c "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))" 2>/dev/null)
if [ "${ngpu:-0}" -ge 1 ]; then
  CUDA_VISIBLE_DEVICES=0 run gpu1
  if [ -n "${SERVE_BATCH:-}" ]; then
    CUDA_VISIBLE_DEVICES=0 run gpu1_serve --max-batch "$SERVE_BATCH" \
        ${SERVE_PAGES:+--num-pages "$SERVE_PAGES"}
  fi
fi
if [ "${ngpu:-0}" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 run gpu2_tensor --mesh data=1,tensor=2,expert=1
  CUDA_VISIBLE_DEVICES=0,1 run gpu2_expert --mesh data=1,tensor=1,expert=2
fi
# The reference: the CPU xla path (CPU_XLA=0 skips it, e.g. to run it on another machine on
# the same checkpoint: make_tiny_checkpoint.py is deterministic; compare checksums.md5).
(cd "$ckpt" && md5sum *.safetensors > "$out/checksums.md5")
if [ "${CPU_XLA:-1}" = 1 ]; then
  JAX_PLATFORMS=cpu run cpu_xla --implementation xla
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{out}/*.json"))
        if not p.endswith("summary.json")}
ref_name = "cpu_xla" if "cpu_xla" in runs else "gpu1"  # CPU_XLA=0: the GPU's static batch
ref = runs.get(ref_name, {}).get("generated_ids")
rows = []
for name, r in runs.items():
  admitted = [q.get("admitted_step") for q in r.get("requests", [])]
  rows.append({"run": name, "mesh": r["mesh"], "same_tokens": r["generated_ids"] == ref,
               "prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"],
               "peak_gib_per_device": [round(b / 2**30, 2)
                                       for b in r.get("peak_bytes_per_device", [])],
               "admitted_steps": admitted or None})
json.dump({"reference": ref_name, "rows": rows}, open(f"{out}/summary.json", "w"), indent=1)
print(f"| run | mesh | same tokens as {ref_name} | prefill tok/s | decode tok/s | "
      f"peak GiB per device | requests admitted at step |")
print("|---|---|---|---|---|---|---|")
for r in rows:
  dec = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
  print(f"| {r['run']} | {r['mesh']} | {r['same_tokens']} | {r['prefill_tok_s']:.0f} | "
        f"{dec} | {r['peak_gib_per_device'] or '-'} | {r['admitted_steps'] or '-'} |")
PY
