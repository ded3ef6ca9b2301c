#!/usr/bin/env bash
# Served decode (continuous batching, --max-batch) against a static batch on one GPU, as users
# run scripts/generate.py: random weights of CONFIG made on the device (--random-weights), bf16,
# requests of mixed prompt lengths from files. The static run decodes the first MAX_BATCH
# prompts as one batch; the served run takes all REQUESTS prompts as a queue over MAX_BATCH
# rows of a paged cache (later requests admitted as earlier ones leave). Prints both runs'
# last lines and the served/static decode tokens/s ratio. Usage:
#   benchmarks/recipes/serve_vs_static.sh OUT_DIR
set -uo pipefail
out=${1:?usage: serve_vs_static.sh OUT_DIR}
mkdir -p "$out"
config=${CONFIG:-gen_1b}
batch=${MAX_BATCH:-8}
requests=${REQUESTS:-16}
new=${NEW_TOKENS:-128}
python3 - "$out" "$requests" <<'PY'
import random, sys
out, n = sys.argv[1], int(sys.argv[2])
r = random.Random(0)
for i in range(n):
  length = r.randrange(1000, 8000)
  with open(f"{out}/prompt_{i}.txt", "w") as f:
    f.write(" ".join(str(r.randrange(1, 32000)) for _ in range(length)))
PY
files() { for i in $(seq 0 $(($1 - 1))); do echo --prompt-ids-file "$out/prompt_$i.txt"; done; }
common="--random-weights $config --dtype bfloat16 --max-new-tokens $new --quiet"
python3 scripts/generate.py $common $(files "$batch") --output-json "$out/static.json" \
    > "$out/static.log" 2>&1; echo "static rc=$? $(tail -1 "$out/static.log")"
python3 scripts/generate.py $common $(files "$requests") --max-batch "$batch" \
    --output-json "$out/served.json" > "$out/served.log" 2>&1
echo "served rc=$? $(tail -1 "$out/served.log")"
python3 - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/static.json"))
v = json.load(open(f"{sys.argv[1]}/served.json"))
ratio = v["decode_tokens_per_s"] / s["decode_tokens_per_s"]
print(json.dumps({"static_decode_tok_s": s["decode_tokens_per_s"],
                  "served_decode_tok_s": v["decode_tokens_per_s"], "served_over_static": ratio,
                  "static_prefill_tok_s": s["prefill_tokens_per_s"],
                  "served_prefill_tok_s": v["prefill_tokens_per_s"]}))
PY
