"""Summarise a benchmarks/recipes/finetune_demo.sh run: a markdown table and one PNG of the curves.

Reads RUNS_DIR/<stage>/metrics.jsonl (training loss and periodic retrieval accuracy of every
stage, in order) and RUNS_DIR/eval_*.json (scripts/evaluate.py on the same held-out examples),
writes RUNS_DIR/demo.md and RUNS_DIR/demo.png, and prints the table.

Usage: python3 benchmarks/recipes/finetune_demo_report.py RUNS_DIR [--dense-target 0.95]
       [--recall-target 0.9]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

STAGES = ("a1_dense_256", "a2_dense_1k", "b_dense_8k", "c_msa_8k", "d_msa_8k")


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def table(runs: str, dense_target: float, recall_target: float) -> str:
  evals = {os.path.basename(p)[5:-5]: json.load(open(p))
           for p in sorted(glob.glob(os.path.join(runs, "eval_*.json")))}
  if "d_msa_8k" not in evals:
    raise SystemExit(f"{runs}: no eval_d_msa_8k.json yet (the demo has not finished)")
  conv = evals["d_msa_8k"]
  data = conv["data"]
  rows = [("dense model before conversion", evals.get("b_dense_8k", {}).get("variants", {})
           .get("dense"))]
  names = {"dense": "converted model, dense attention", "msa": "converted model, MSA",
           "msa-random-indexer": "converted model, MSA with a random indexer"}
  rows += [(names[k], v) for k, v in conv["variants"].items()]
  budget = conv["topk"] * conv["block_size"]
  out = [f"Held-out retrieval at {data['seq_len']} tokens ({data['num_pairs']} pairs, "
         f"{data['num_queries']} queries per example, {rows[1][1].get('examples', '?')} "
         f"examples); MSA keeps k·Bk = {conv['topk']}·{conv['block_size']} = {budget} tokens "
         f"= 1/{data['seq_len'] // budget} of the context.", "",
         "| model / attention | accuracy | loss | block recall | score recall | "
         "block recall at answers | block recall, max-pool I* | oracle block recall |",
         "|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  for name, v in rows:
    if v is None:
      continue
    out.append(f"| {name} | {fmt(v['accuracy'])} | {fmt(v['loss'])} | "
               f"{fmt(v.get('block_recall'))} | {fmt(v.get('score_recall'))} | "
               f"{fmt(v.get('block_recall_scored'))} | {fmt(v.get('block_recall_maxpool'))} | "
               f"{fmt(v.get('oracle_block_recall'))} |")
  dense = (evals.get("b_dense_8k") or conv)["variants"]["dense"]["accuracy"]
  msa = conv["variants"]["msa"]
  ratio = msa["accuracy"] / dense if dense else float("nan")
  random_acc = conv["variants"].get("msa-random-indexer", {}).get("accuracy")
  out += ["", f"MSA after conversion / dense before: {ratio:.3f} (target >= {dense_target}: "
          f"{'met' if ratio >= dense_target else 'not met'}); block recall "
          f"{fmt(msa.get('block_recall'))} (target >= {recall_target}: "
          f"{'met' if (msa.get('block_recall') or 0) >= recall_target else 'not met'}); random "
          f"indexer {fmt(random_acc)}.", "",
          "Block recall compares the index selection with the main branch's top-k blocks by "
          "summed attention mass; the max-pool column ranks those blocks by their largest token "
          "probability (MSA's own pooling); the oracle is the block recall of a perfect "
          "KL-trained indexer (models/metrics.py)."]
  return "\n".join(out)


def recall_bars(runs: str, ax):
  """Per-layer block recall of the converted model's indexer, of a random indexer and of the
  oracle (a perfect KL-trained indexer), from eval_d_msa_8k.json."""
  path = os.path.join(runs, "eval_d_msa_8k.json")
  if not os.path.exists(path):
    return
  variants = json.load(open(path))["variants"]
  bars = [("trained indexer (MSA)", variants.get("msa"), "block_recall"),
          ("random indexer", variants.get("msa-random-indexer"), "block_recall"),
          ("oracle: perfect KL fit", variants.get("msa"), "oracle_block_recall"),
          ("trained, vs max-pool I*", variants.get("msa"), "block_recall_maxpool")]
  bars = [b for b in bars if b[1] and b[2] in b[1]]
  layers = sorted(bars[0][1]["layers"], key=int) if bars else []
  width = 0.8 / max(len(bars), 1)
  for i, (label, v, key) in enumerate(bars):
    ax.bar([int(l) + (i - (len(bars) - 1) / 2) * width for l in layers],
           [v["layers"][l][key] for l in layers], width, label=label)
  ax.axhline(0.9, color="grey", ls="--", lw=0.8)
  ax.set(xlabel="layer", ylabel="block recall (all queries)", ylim=(0, 1),
         xticks=[int(l) for l in layers])


def plot(runs: str, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_acc, ax_rec) = plt.subplots(1, 3, figsize=(17, 4.5))
  offset = 0
  for stage in STAGES:
    log = os.path.join(runs, stage, "metrics.jsonl")
    if not os.path.exists(log):
      continue
    rows = read_jsonl(log)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    line, = ax_loss.plot([offset + r["step"] for r in train], [r["lm_loss"] for r in train],
                         lw=0.8, label=stage)
    if any(r.get("kl") for r in train):  # the indexer's KL (conversion stage)
      ax_loss.plot([offset + r["step"] for r in train], [r["kl"] for r in train], ":",
                   color=line.get_color(), lw=0.8, label=f"{stage} KL (all layers)")
    ax_acc.plot([offset + r["step"] for r in evals], [r["eval"]["accuracy"] for r in evals],
                "o-", ms=3, label=stage)
    if train:
      offset += train[-1]["step"]
      ax_loss.axvline(offset, color="grey", lw=0.5)
      ax_acc.axvline(offset, color="grey", lw=0.5)
  ax_loss.set(xlabel="step (stages one after another)", ylabel="LM loss on the answers; KL",
              yscale="log")
  ax_acc.set(xlabel="step (stages one after another)", ylabel="held-out retrieval accuracy",
             ylim=(0, 1))
  recall_bars(runs, ax_rec)
  for ax in (ax_loss, ax_acc, ax_rec):
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", help="the RUNS_DIR of benchmarks/recipes/finetune_demo.sh")
  p.add_argument("--dense-target", type=float, default=0.95)
  p.add_argument("--recall-target", type=float, default=0.9)
  args = p.parse_args(argv)
  plot(args.runs, os.path.join(args.runs, "demo.png"))
  text = table(args.runs, args.dense_target, args.recall_target)
  with open(os.path.join(args.runs, "demo.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
