"""Model-level benchmark: prefill and decode of a MiniMax-M3-family model as users run it.

Runs ``models.serving.Generator`` (the code behind ``scripts/generate.py``) on random weights
made on the device (``models.checkpoint.random_init``), batch 1 prompts of each
``--prefill-sizes`` length in chunks of ``--prefill-chunk``, for

* the model as configured (MSA layers), and
* the same weights with dense attention in every layer (``dense``: MSA layers run as
  full-attention layers; the index projections are left unused).

Dense prefill of prompts above ``--dense-full-limit`` tokens is not run whole: its first and
last chunks are timed (the last after a cache filled to ``N - chunk``), and the total is
extrapolated with a cost linear in the prefix (``chunks * a + b * sum of prefixes``); rows
say so (``dense_extrapolated``).

Decode: for each batch in ``--decode-batches`` and context in ``--decode-contexts``, the
caches are filled with random values up to the context (decode's cost does not depend on the
cached values), then ``--decode-steps`` steps run in blocks of ``--decode-block`` inside one
jitted loop each; the step time is set beside its byte floor: weights read per step (every
non-expert matrix, the embedding rows of the batch, the distinct routed experts expected under
uniform routing) + per sequence the full-attention layers' keys and values, the MSA layers'
index keys and selected blocks. The floor's time uses the read bandwidth measured in the same
process (a read-only Pallas kernel and an XLA reduction, the faster; the copy is reported
beside it).

Model FLOP utilisation of prefill = useful FLOPs / time / the measured bf16 matmul ceiling;
useful FLOPs = 2 x active parameters per token (the last token's ``lm_head`` only) + the
attention's (full: ``4 D Hq`` per causal pair; MSA: index ``2 Di G`` per causal pair and
``4 D Hq`` per selected visible pair).

Writes ``<output-dir>/<tag>.json``, ``.md`` and ``.png`` and prints the tables last.

Examples:
  python3 scripts/benchmark_model.py --configs gen_1b m3_slice            # on a GPU
  python3 scripts/benchmark_model.py --smoke --output-dir /tmp/bm              # CPU self-test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import math
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import checkpoint
from models import cli
from models import serving
from msa_jax import profiling


# ----------------------------------------------------------------------------- ceilings


def _time(fn, iters=10):
  """Median seconds of ``fn()`` over ``iters`` calls after a warm-up."""
  return profiling.timed(lambda: jax.block_until_ready(fn()), iters=iters,
                         budget_s=math.inf)[0] / 1e3


def _read_kernel(x_ref, o_ref, *, rows, tile):
  """Sum ``rows`` rows of x from this program's start, ``tile`` rows per loaded block."""
  from jax.experimental import pallas as pl
  first = pl.program_id(0) * rows

  def body(j, acc):
    return acc + x_ref[pl.ds(first + j * tile, tile), :].astype(jnp.float32)

  acc = jax.lax.fori_loop(0, rows // tile, body, jnp.zeros((tile, x_ref.shape[1]), jnp.float32))
  o_ref[...] = jnp.sum(acc, axis=0, keepdims=True)


def _read_gemm_kernel(k_ref, o_ref, *, rows, tile):
  """Max of ones @ tile.T over ``rows`` rows of [N, 128] keys from this program's start."""
  from jax.experimental import pallas as pl
  first = pl.program_id(0) * rows
  ones = jnp.ones((16, k_ref.shape[1]), k_ref.dtype)

  def body(j, acc):
    k = k_ref[pl.ds(pl.multiple_of(first + j * tile, tile), tile), :]
    return jnp.maximum(acc, jax.lax.dot_general(ones, k, (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32))

  o_ref[...] = jax.lax.fori_loop(0, rows // tile, body,
                                 jnp.full((16, tile), -jnp.inf, jnp.float32))


def ceilings(small: bool) -> dict:
  """bf16 matmul rate, read bandwidth (the faster of a Pallas and an XLA read) and copy."""
  n = 256 if small else 8192
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
  t_mm = _time(lambda: jax.jit(jnp.matmul)(a, b))
  out = {"matmul_tflops": 2 * n ** 3 / t_mm / 1e12}
  out.update(read_bandwidth(small))
  x = jax.random.normal(jax.random.PRNGKey(3), (1 << (10 if small else 20), 1024), jnp.bfloat16)
  copy = jax.jit(lambda x: x * jnp.asarray(1.5, x.dtype))
  out["copy_tbps"] = 2 * x.nbytes / _time(lambda: copy(x)) / 1e12
  return out


def read_bandwidth(small: bool) -> dict:
  """Read-only streams over 2 GiB (XLA reductions and, on GPUs, looping Pallas programs):
  ``read_tbps`` is the fastest, the ceiling a read-bound step is measured against."""
  rows = 1 << (10 if small else 20)  # [rows, 1024] bf16: 2 GiB on a GPU
  x = jax.random.normal(jax.random.PRNGKey(3), (rows, 1024), jnp.bfloat16)
  out = {}
  reads = {"xla_sum": jax.jit(lambda x: jnp.sum(x.astype(jnp.float32), axis=0)),
           "xla_row_sum": jax.jit(lambda x: jnp.sum(x.astype(jnp.float32), axis=1))}
  if jax.default_backend() == "gpu":  # read-only streams: each program loops over its rows
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltr
    for per_program, tile, warps, stages in ((256, 16, 4, 4), (512, 32, 8, 3),
                                            (1024, 16, 4, 6)):
      reads[f"pallas_{per_program}x{tile}"] = jax.jit(functools.partial(
          lambda x, per_program, tile, warps, stages: pl.pallas_call(
              functools.partial(_read_kernel, rows=per_program, tile=tile),
              grid=(rows // per_program,), in_specs=[pl.BlockSpec()],
              out_specs=pl.BlockSpec((1, 1024), lambda i: (i, 0)),
              out_shape=jax.ShapeDtypeStruct((rows // per_program, 1024), jnp.float32),
              compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=stages))(x),
          per_program=per_program, tile=tile, warps=warps, stages=stages))
    # As the index kernels read: [128, 128] tiles through a GEMM (cp.async pipelines).
    programs = x.size // 128 // 4096  # 4096 keys (1 MiB) per program
    reads["pallas_gemm"] = jax.jit(lambda x: pl.pallas_call(
        functools.partial(_read_gemm_kernel, rows=4096, tile=128),
        grid=(programs,), in_specs=[pl.BlockSpec()],
        out_specs=pl.BlockSpec((None, 16, 128), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((programs, 16, 128), jnp.float32),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=4))(x.reshape(-1, 128)))
  for name, fn in reads.items():
    try:
      out[f"read_tbps_{name}"] = x.nbytes / _time(lambda fn=fn: fn(x)) / 1e12
    except Exception as e:  # noqa: BLE001 (a variant that does not compile is skipped)
      out[f"read_error_{name}"] = str(e)[:200]
  out["read_tbps"] = max(v for k, v in out.items() if k.startswith("read_tbps_"))
  return out


# ----------------------------------------------------------------------------- counting


def _param_counts(model) -> dict:
  """Parameters by role: what a token's forward multiplies by."""
  c = model.config
  from flax import nnx
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  experts = sum(v.size for p, v in flat.items() if p[-1] in ("w1", "w2", "w3"))
  embed = flat[("embed_tokens",)].size
  head = flat[("lm_head", "kernel")].size
  total = sum(v.size for v in flat.values())
  per_expert = 3 * c.hidden_size * c.intermediate_size
  itemsize = jnp.dtype(model.dtype).itemsize
  return {"total": total, "experts": experts, "embed": embed, "lm_head": head,
          "per_expert": per_expert, "dense_rest": total - experts - embed - head,
          "moe_layers": sum(c.moe_layers), "itemsize": itemsize}


def _causal_pairs(n0: int, n1: int) -> float:
  """Causal (query, key) pairs of queries at positions [n0, n1)."""
  p = np.arange(n0, n1, dtype=np.float64)
  return float((p + 1).sum())


def _selected_pairs(n0: int, n1: int, block: int, topk: int) -> float:
  """Visible pairs of MSA's selection (own partial block + topk-1 whole earlier blocks)."""
  p = np.arange(n0, n1, dtype=np.float64)
  return float(np.minimum(p + 1, (topk - 1) * block + p % block + 1).sum())


def prefill_flops(model, n: int, *, dense: bool, chunks: int) -> float:
  c = model.config
  counts = _param_counts(model)
  linear = counts["dense_rest"] + counts["moe_layers"] * (
      c.num_experts_per_tok * counts["per_expert"])
  flops = 2.0 * linear * n + 2.0 * counts["lm_head"] * chunks  # last token of each chunk
  causal = _causal_pairs(0, n)
  for sparse in c.sparse_layers:
    if sparse and not dense:
      flops += 2 * c.index_head_dim * c.num_kv_heads * causal
      flops += 4 * c.head_dim * c.num_heads * _selected_pairs(0, n, c.index_block_size,
                                                              c.index_topk_blocks)
    else:
      flops += 4 * c.head_dim * c.num_heads * causal
  return flops


def decode_floor_bytes(model, batch: int, context: int) -> dict:
  """Bytes a decode step must read (see the module docstring)."""
  c = model.config
  counts = _param_counts(model)
  item = counts["itemsize"]
  e, k = max(c.num_experts, 1), c.num_experts_per_tok
  distinct = e * (1 - (1 - k / e) ** batch) if c.num_experts else 0.0
  weights = (counts["dense_rest"] + counts["lm_head"] + batch * c.hidden_size
             + counts["moe_layers"] * distinct * counts["per_expert"]) * item
  kv = 0.0
  for sparse in c.sparse_layers:
    if sparse:
      kv += context * c.index_head_dim * item  # every index key
      kv += min(context, c.index_topk_blocks * c.index_block_size) * c.num_kv_heads * \
          c.head_dim * 2 * item  # the selected blocks' K and V
    else:
      kv += context * c.num_kv_heads * c.head_dim * 2 * item
  return {"weights": weights, "kv": batch * kv, "total": weights + batch * kv}


# ----------------------------------------------------------------------------- model variants


def _set_dense(model, dense: bool, sparse_layers):
  for layer, sparse in zip(model.layers, sparse_layers):
    layer.self_attn.sparse = sparse and not dense


def _generator(model, *, dense, batch, max_len, chunk, block):
  """A Generator of the model as configured or with dense attention in every layer (same
  weights: only the layers' ``sparse`` switch differs, captured in the generator's graph)."""
  sparse_layers = model.config.sparse_layers
  _set_dense(model, dense, sparse_layers)
  try:
    return serving.Generator(model, batch=batch, max_len=max_len, prefill_chunk=chunk,
                             decode_block=block)
  finally:
    _set_dense(model, False, sparse_layers)


def _fill(cache, lengths, seed=0):
  """A cache holding random values and ``lengths`` tokens per row (decode at a context)."""
  key = jax.random.PRNGKey(seed)

  def rand(x, i):
    if x is None:
      return None
    return jax.jit(lambda k: jax.random.normal(k, x.shape, x.dtype),
                   out_shardings=x.sharding)(jax.random.fold_in(key, i))

  k = tuple(rand(x, i) for i, x in enumerate(cache.k))
  v = tuple(rand(x, 100 + i) for i, x in enumerate(cache.v))
  ik = tuple(rand(x, 200 + i) for i, x in enumerate(cache.index_k))
  del cache
  return models.Cache(k, v, ik, jnp.asarray(lengths, jnp.int32))


def _peak():
  try:
    return max(int(d.memory_stats().get("peak_bytes_in_use", 0)) for d in jax.local_devices())
  except Exception:  # CPU: no memory stats
    return None


@contextlib.contextmanager
def _row(row: dict, rows: list, log):
  """One measured row: a failure is recorded in it (the other rows go on), then the peak
  memory so far is added and the row is kept and logged."""
  try:
    yield row
  except Exception as e:  # noqa: BLE001
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    traceback.print_exc()
  row["peak_bytes"] = _peak()
  rows.append(row)
  log(row)


# ----------------------------------------------------------------------------- prefill


def prefill_rows(model, args, log):
  rows = []
  chunk = args.prefill_chunk
  max_n = max(args.prefill_sizes)
  rng = np.random.default_rng(0)
  for dense in {"msa": (False,), "dense": (True,), "both": (False, True)}[args.attention]:
    label = "dense" if dense else "msa"
    gen = _generator(model, dense=dense, batch=1, max_len=max_n + args.decode_block,
                     chunk=chunk, block=args.decode_block)
    t0 = time.perf_counter()
    cache = gen.init_cache()
    gen.compile(cache)
    compile_s = time.perf_counter() - t0
    gen.prefill([rng.integers(0, model.config.vocab_size, chunk).tolist()], cache)  # warm-up
    del cache
    for n in args.prefill_sizes:
      row = {"model": args.current, "attention": label, "N": n, "chunk": chunk,
             "compile_s": compile_s}
      prompt = rng.integers(0, model.config.vocab_size, n).tolist()
      with _row(row, rows, log):
        if dense and n > args.dense_full_limit:
          row.update(_extrapolated_prefill(gen, prompt, chunk))
        else:
          gen.timings = serving.Timings()
          cache = gen.init_cache()
          logits, cache = gen.prefill([prompt], cache)
          assert bool(jnp.isfinite(logits).all()), "non-finite logits"
          row["prefill_s"] = gen.timings.prefill_s
          del cache, logits
        chunks = -(-n // chunk)
        row["useful_tflop"] = prefill_flops(model, n, dense=dense, chunks=chunks) / 1e12
        row["tflops"] = row["useful_tflop"] / row["prefill_s"]
        row["mfu"] = row["tflops"] / args.ceilings["matmul_tflops"]
        row["tokens_per_s"] = n / row["prefill_s"]
    del gen
  return rows


def _extrapolated_prefill(gen, prompt, chunk):
  """Time the first chunk and the last (after a filled prefix): total by a linear model."""
  n = len(prompt)
  starts = list(range(0, n, chunk))
  gen.timings = serving.Timings()
  cache = gen.init_cache()
  gen.prefill([prompt[:chunk]], cache)
  first = gen.timings.prefill_s
  del cache
  last_start = starts[-1]
  cache = _fill(gen.init_cache(), [last_start])
  gen.timings = serving.Timings()
  # The last chunk on top of a cache holding last_start tokens: one prefill call.
  tokens = np.zeros((1, gen.prefill_chunk), np.int32)
  piece = prompt[last_start:]
  tokens[0, :len(piece)] = piece
  put = gen._put  # noqa: SLF001 (the generator's own call, as in prefill)
  logits = put(np.zeros((1, gen.config.vocab_size), np.float32))
  t0 = time.perf_counter()
  cache, logits = gen._compiled["prefill"](gen.state, cache, put(tokens),  # noqa: SLF001
                                           put(np.array([len(piece)], np.int32)),
                                           put(np.array([True])), logits)
  logits.block_until_ready()
  last = time.perf_counter() - t0
  del cache
  b = (last - first) / max(last_start, 1)
  total = len(starts) * first + b * sum(starts)
  return {"prefill_s": total, "dense_extrapolated": True, "first_chunk_s": first,
          "last_chunk_s": last}


# ----------------------------------------------------------------------------- decode


def decode_rows(model, args, log):
  """Per batch one generator whose cache holds the longest context (as a server's would);
  each context fills it to that length and times ``--decode-steps`` steps."""
  rows = []
  steps = args.decode_steps
  for batch in args.decode_batches:
    gen = None
    for context in sorted(args.decode_contexts):
      row = {"model": args.current, "attention": "msa", "batch": batch, "context": context,
             "cache_len": max(args.decode_contexts) + steps + args.decode_block}
      with _row(row, rows, log):
        if gen is None:
          gen = _generator(model, dense=False, batch=batch, max_len=row["cache_len"],
                           chunk=16, block=args.decode_block)
        t0 = time.perf_counter()
        cache = _fill(gen.init_cache(), [context] * batch, seed=batch)
        gen.compile(cache, steps=("decode",))
        row["compile_s"] = time.perf_counter() - t0
        logits = gen._put(np.asarray(  # noqa: SLF001
            jax.random.normal(jax.random.PRNGKey(5), (batch, model.config.vocab_size))))
        _, cache = gen.decode(logits, cache, max_new_tokens=args.decode_block)  # warm
        cache = cache._replace(lengths=gen._put(np.full(batch, context, np.int32)))  # noqa
        gen.timings = serving.Timings()
        tokens, cache = gen.decode(logits, cache, max_new_tokens=steps)
        row["step_ms"] = gen.timings.decode_s / steps * 1e3
        row["tokens_per_s"] = batch * steps / gen.timings.decode_s
        floor = decode_floor_bytes(model, batch, context)
        row["floor_GB"] = floor["total"] / 1e9
        row["floor_weights_GB"] = floor["weights"] / 1e9
        row["floor_ms"] = floor["total"] / (args.ceilings["read_tbps"] * 1e12) * 1e3
        row["x_floor"] = row["step_ms"] / row["floor_ms"]
        row["achieved_TBps"] = floor["total"] / (row["step_ms"] * 1e-3) / 1e12
        del cache
    del gen
  return rows


# ----------------------------------------------------------------------------- report


def _fmt_n(n):
  return f"{n // 1024}K" if n >= 1024 else str(n)


def _fmt_s(s):
  return "—" if s is None else (f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s")


def markdown(result) -> str:
  m = result["meta"]
  c = result["ceilings"]
  lines = [f"Model-level benchmark on {m['device']}, jax {m['jax']}, commit {m['commit']}, "
           f"{m['date']}. Ceilings in this process: bf16 matmul {c['matmul_tflops']:.0f} "
           f"TFLOP/s, read {c['read_tbps']:.2f} TB/s, copy {c['copy_tbps']:.2f} TB/s.", "",
           "| model | N | MSA prefill | dense prefill | speedup | MSA tok/s | MSA MFU | "
           "dense MFU | peak memory so far |", "|---|---|---|---|---|---|---|---|---|"]
  by = {(r["model"], r["attention"], r["N"]): r for r in result["prefill"]}
  for (model, att, n), r in sorted(by.items()):
    if att != "msa":
      continue
    d = by.get((model, "dense", n), {})
    ms, ds = r.get("prefill_s"), d.get("prefill_s")
    speed = f"{ds / ms:.2f}×" if ms and ds else "—"
    ext = " (extrapolated)" if d.get("dense_extrapolated") else ""
    peak = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "—"
    mfu = lambda x: f"{x['mfu'] * 100:.0f}%" if x.get("mfu") else "—"
    err = f" error: {r['error'][:80]}" if r.get("error") else ""
    lines.append(f"| {model} | {_fmt_n(n)} | {_fmt_s(ms)}{err} | {_fmt_s(ds)}{ext} | {speed} | "
                 f"{r.get('tokens_per_s', 0):,.0f} | {mfu(r)} | {mfu(d)} | {peak} |")
  lines += ["", "| model | batch | context | step | tokens/s | byte floor | floor time | "
            "× floor | achieved TB/s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["decode"]:
    if r.get("error"):
      lines.append(f"| {r['model']} | {r['batch']} | {_fmt_n(r['context'])} | error: "
                   f"{r['error'][:100]} | | | | | |")
      continue
    lines.append(f"| {r['model']} | {r['batch']} | {_fmt_n(r['context'])} | "
                 f"{r['step_ms']:.3f} ms | {r['tokens_per_s']:,.0f} | {r['floor_GB']:.2f} GB | "
                 f"{r['floor_ms']:.3f} ms | {r['x_floor']:.2f} | {r['achieved_TBps']:.2f} |")
  return "\n".join(lines)


def plot(result, path):
  """Prefill seconds against prompt length and decode steps against their floors (a panel
  for each that the result has)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  prefill = [r for r in result["prefill"] if r.get("prefill_s")]
  decode = [r for r in result["decode"] if r.get("step_ms")]
  panels = [name for name, rows in (("prefill", prefill), ("decode", decode)) if rows]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  axes = dict(zip(panels, axes[0]))
  if "prefill" in axes:
    ax = axes["prefill"]
    for model in sorted({r["model"] for r in prefill}):
      for att, style in (("msa", "o-"), ("dense", "s--")):
        rows = sorted((r for r in prefill if r["model"] == model and r["attention"] == att),
                      key=lambda r: r["N"])
        if rows:
          ax.plot([r["N"] for r in rows], [r["prefill_s"] for r in rows], style,
                  label=f"{model} {att}")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds",
           title="Prefill, batch 1")
    ax.legend()
  if "decode" in axes:
    ax = axes["decode"]
    labels = [f"{r['model']}\nb{r['batch']} {_fmt_n(r['context'])}" for r in decode]
    x = np.arange(len(decode))
    ax.bar(x - 0.2, [r["step_ms"] for r in decode], 0.4, label="measured step")
    ax.bar(x + 0.2, [r["floor_ms"] for r in decode], 0.4, label="byte floor")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="ms per decode step", title="Decode step vs its byte floor")
    ax.legend()
  fig.suptitle(f"{result['meta']['device']}, jax {result['meta']['jax']}, "
               f"{result['meta']['commit']}, {result['meta']['date']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--configs", nargs="+", default=["gen_1b", "m3_slice"],
                      help="presets or config.json paths")
  parser.add_argument("--prefill-sizes", type=int, nargs="+", default=[131072, 1048576],
                      help="prompt lengths, batch 1")
  parser.add_argument("--prefill-chunk", type=int, default=16384,
                      help="prefill chunk")
  parser.add_argument("--dense-full-limit", type=int, default=131072,
                      help="dense prefill above this many tokens is timed on its first and "
                           "last chunks and extrapolated (default 131072)")
  parser.add_argument("--attention", default="both", choices=["msa", "dense", "both"],
                      help="prefill of the model as configured, of the dense variant, or both")
  parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8],
                      help="decode batch sizes")
  parser.add_argument("--decode-contexts", type=int, nargs="+", default=[8192, 131072],
                      help="decode cache lengths")
  parser.add_argument("--decode-steps", type=int, default=64,
                      help="timed decode steps per row")
  parser.add_argument("--decode-block", type=int, default=16,
                      help="decode steps per jitted call (default 16)")
  parser.add_argument("--skip-prefill", action="store_true", help="no prefill rows")
  parser.add_argument("--skip-decode", action="store_true", help="no decode rows")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="parameter and activation dtype")
  parser.add_argument("--output-dir", default=None,
                      help="where <tag>.json/.md/.png go (default: "
                           "benchmarks/results/<card>/model)")
  parser.add_argument("--tag", default=None, help="file name stem (default: model_<commit>)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes on any backend (tests the script; numbers mean "
                           "nothing)")
  args = parser.parse_args(argv)
  args.output_dir = args.output_dir or cli.results_dir("model")
  if args.smoke:
    args.configs = ["tiny"]
    args.prefill_sizes = [96, 160]
    args.prefill_chunk = 64
    args.dense_full_limit = 100
    args.decode_contexts = [40]
    args.decode_steps = 4
    args.decode_block = 2
    args.dtype = "float32"
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "jax": jax.__version__, "commit": cli.commit(),
          "date": datetime.date.today().isoformat(), "dtype": args.dtype,
          "args": {k: v for k, v in vars(args).items() if k != "configs"},
          "configs": args.configs}
  os.makedirs(args.output_dir, exist_ok=True)
  tag = args.tag or f"model_{meta['commit']}"
  stem = os.path.join(args.output_dir, tag)
  result = {"meta": meta, "ceilings": ceilings(small=args.smoke), "prefill": [], "decode": []}
  args.ceilings = result["ceilings"]
  print(json.dumps(result["ceilings"]), flush=True)

  def save():
    with open(stem + ".json", "w") as f:
      json.dump(result, f, indent=1, default=str)

  def log(row):
    print(json.dumps(row, default=str), flush=True)
    save()

  for name in args.configs:
    args.current = name
    t0 = time.perf_counter()
    model = checkpoint.random_init(name, dtype=dtype, param_dtype=dtype,
                                   implementation=None)
    counts = _param_counts(model)
    meta.setdefault("models", {})[name] = {"parameters": counts["total"],
                                           "init_s": time.perf_counter() - t0}
    if not args.skip_prefill:
      result["prefill"] += prefill_rows(model, args, log)
    if not args.skip_decode:
      result["decode"] += decode_rows(model, args, log)
    del model
  save()
  table = markdown(result)
  with open(stem + ".md", "w") as f:
    f.write(table + "\n")
  try:
    plot(result, stem + ".png")
  except Exception:  # noqa: BLE001 (the numbers matter more than the picture)
    traceback.print_exc()
  print(table)
  return 0


run = cli.console_command(main)


if __name__ == "__main__":
  run()
