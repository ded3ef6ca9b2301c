"""Where the Mosaic GPU sparse kernel's time goes: variants and ablations on one prefill chunk.

Times ``sparse_attention_mgpu.sparse_attention_partials`` on the last ``--chunk`` queries of a
``--context``-token prefill (the tuner's workload: M3 shapes, random inputs, the selection of
the Pallas index kernel) under

* variants of the kernel (code-path switches and launch parameters), each checked against the
  Triton kernel on the first queries before it is timed, and
* ablations: the same kernel with parts of its work left out (``_OPTIONS["ablate"]``: no q
  gathers, no K/V loads, no softmax, no output stores). Their results are wrong; their times
  bound what removing that part's cost could give.

Also times the Triton kernel, the schedule build and the combine on the same chunk, so the
kernel's share of the sparse path is in the same table. Needs a Hopper GPU::

    PYTHONPATH=$PWD python3 benchmarks/probes/sparse_mgpu_ablation.py --out /tmp/ablation

Writes ``ablation.json`` and ``ablation.md`` under ``--out`` and prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax.kernels.gpu import sparse_attention as triton_kernel
from msa_jax.kernels.gpu import sparse_attention_mgpu as mgpu

HQ, G, D, BK, TOPK = 64, 4, 128, 128, 16

# (label, code-path switches, launch parameters). The first is the kernel as it was before the
# switches existed (scalars read at the start of each item, 2 q slots).
VARIANTS = [
    ("before (no prefetch, 2 q slots)", {"prefetch": False}, {}),
    ("prefetch scalars", {}, {}),
    ("prefetch + 3 q slots", {}, {"num_stages": 3}),
    ("skip mask", {}, {"skip_mask": True}),
    ("skip mask + 3 q slots", {}, {"skip_mask": True, "num_stages": 3}),
    ("skip mask + 3 q slots + pingpong", {},
     {"skip_mask": True, "num_stages": 3, "pingpong": True}),
]
# Ablations, on the kernel with these switches and launch parameters. (Runs before 3d76294
# also timed "deferred stores" and, at 75cc77f, "overlap QK": variants since removed.)
ABLATION_BASE = ({}, {"skip_mask": True, "num_stages": 3})
ABLATIONS = [("q",), ("kv",), ("store",), ("o_store",), ("lse_store",), ("softmax",),
             ("q", "kv", "store"), ("q", "kv", "store", "softmax")]


def timed(fn, iters):
  fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3, min(times) * 1e3


@contextlib.contextmanager
def options(**kw):
  saved = dict(mgpu._OPTIONS)
  mgpu._OPTIONS.update(kw)
  try:
    yield
  finally:
    mgpu._OPTIONS.clear()
    mgpu._OPTIONS.update(saved)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--context", type=int, default=131072)
  parser.add_argument("--chunk", type=int, default=16384)
  parser.add_argument("--iters", type=int, default=50)
  parser.add_argument("--out", default="out/ablation")
  parser.add_argument("--no-ablations", action="store_true",
                      help="time the variants only (and the Triton kernel, schedule, combine)")
  parser.add_argument("--interpret", action="store_true",
                      help="CPU smoke test of this script: tiny sizes through the interpreters "
                           "(the times mean nothing)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  interpret = args.interpret
  if interpret:
    args.context, args.chunk, args.iters = 512, 16, 1
  elif jax.default_backend() != "gpu":
    raise SystemExit("needs a GPU (the Mosaic GPU kernel compiled for Hopper); "
                     "--interpret runs tiny sizes on CPU")

  n, c = args.context, args.chunk
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  rnd = lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16)
  q = rnd(keys[0], (1, c, HQ, D))
  k, v = rnd(keys[1], (1, n, G, D)), rnd(keys[2], (1, n, G, D))
  q_idx, k_idx = rnd(keys[3], (1, c, G, D)), rnd(keys[4], (1, n, D))
  pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
  kvl = jnp.array([n], jnp.int32)
  ids = msa_jax.index_topk(q_idx, k_idx, block_size=BK, topk=TOPK, q_positions=pos,
                           kv_lengths=kvl, implementation="pallas_gpu", interpret=interpret)
  nb = n // BK
  valid = reference.valid_block_mask(ids, nb)
  # Useful FLOPs: every visible (query head, key) pair of the selected blocks, QK and PV.
  last = jnp.minimum(pos[..., None, None], n - 1) - ids * BK + 1
  pairs = float(jnp.sum(jnp.where(valid, jnp.clip(last, 0, BK), 0))) * (HQ // G)
  flops = 4 * D * pairs
  scale = 1 / math.sqrt(D)
  build = jax.jit(sched.build_schedule, static_argnums=(3, 4))

  def runner(module, **cfg):
    per_tile, per_item = module.work_item_size(HQ // G, tile_rows=cfg.pop("tile_rows", None),
                                               tiles_per_item=cfg.pop("tiles_per_item", None))
    schedule = build(ids, valid, pos, nb, per_item)
    f = jax.jit(lambda q, k, v, s: module.sparse_attention_partials(
        q, k, v, s, kvl, block_size=BK, scale=scale, topk=TOPK, queries_per_tile=per_tile,
        tiles_per_item=per_item // per_tile, interpret=interpret, **cfg))
    head = lambda: sched.combine(*[x[:, :, :1024] for x in f(q, k, v, schedule)],
                                 valid[:, :1024], jnp.float32)
    one = jax.jit(lambda *a: f(*a)[1][0, 0, 0, 0])  # one element out: no copy of partials
    return (lambda: one(q, k, v, schedule)), head, schedule

  rows = []

  def record(label, fn, check=None, kernel=True):
    try:
      ms, fastest = timed(fn, args.iters)
    except Exception as e:  # e.g. shared memory: report and go on
      rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
      print(json.dumps(rows[-1]), flush=True)
      return
    row = {"variant": label, "ms": ms, "min_ms": fastest}
    if kernel:
      row["tflops"] = flops / (ms * 1e-3) / 1e12
    if check is not None:
      row.update(check)
    rows.append(row)
    print(json.dumps(row), flush=True)

  triton_fn, triton_head, schedule = runner(triton_kernel, tile_rows=64, tiles_per_item=1)
  want_out, want_lse = triton_head()
  record("triton kernel (64-row tiles)", triton_fn)

  def check(head):
    out, lse = head()
    err = float(jnp.linalg.norm(out - want_out) / jnp.linalg.norm(want_out))
    lse_err = float(jnp.max(jnp.where(jnp.isfinite(want_lse), jnp.abs(lse - want_lse), 0)))
    return {"out_rel_err_vs_triton": err, "lse_err_vs_triton": lse_err,
            "matches_triton": bool(err <= 2e-2 and lse_err <= 1e-2)}

  for label, opts, cfg in VARIANTS:
    with options(**opts):
      try:
        fn, head, _ = runner(mgpu, **cfg)
        result = check(head)
      except Exception as e:
        rows.append({"variant": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        continue
      record(label, fn, result)
  base_opts, base_cfg = ABLATION_BASE
  for parts in ABLATIONS if not args.no_ablations else ():
    with options(ablate=frozenset(parts), **base_opts):
      fn, _, _ = runner(mgpu, **base_cfg)
      record("ablate " + "+".join(parts), fn)

  # The rest of the sparse path on this chunk, for the kernel's share of it.
  per_tile, per_item = mgpu.work_item_size(HQ // G)
  record("schedule build", lambda: build(ids, valid, pos, nb, per_item), kernel=False)
  fn, _, sch = runner(mgpu)
  partial = jax.jit(lambda q, k, v, s: mgpu.sparse_attention_partials(
      q, k, v, s, kvl, block_size=BK, scale=scale, topk=TOPK, queries_per_tile=per_tile,
      tiles_per_item=per_item // per_tile, interpret=interpret))(q, k, v, sch)
  combine = jax.jit(lambda o, l, m: sched.combine(o, l, m, jnp.bfloat16))
  record("combine", lambda: combine(*partial, valid), kernel=False)
  moved = (partial[0].size * 2 + partial[1].size * 4) * 2 + c * HQ * D * 2  # write+read + O
  rows[-1]["partials_GB"] = moved / 1e9

  try:
    commit = os.environ.get("MSA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
  except OSError:
    commit = "unknown"
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": commit,
          "date": datetime.date.today().isoformat(), "context": n, "chunk": c,
          "useful_tflop": flops / 1e12, "iters": args.iters}
  with open(os.path.join(args.out, "ablation.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"{meta['device']}, jax {meta['jax']}, commit {commit}, {meta['date']}: last "
           f"{c} queries of a {n}-token prefill, {flops / 1e12:.2f} TFLOP useful", "",
           "| variant | median ms | min ms | TFLOP/s (median) | matches Triton |",
           "|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['variant']} | error: {r['error'][:80]} | | | |")
    else:
      match = {True: "yes", False: "NO", None: ""}[r.get("matches_triton")]
      tflops = f"{r['tflops']:.0f}" if "tflops" in r else ""
      lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['min_ms']:.3f} | {tflops} | "
                   f"{match} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
