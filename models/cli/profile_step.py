"""Profile one MSA decode step and one prefill chunk: time per GPU kernel, from a jax trace.

Runs ``msa_attention`` at MiniMax-M3 shapes (bf16) under ``jax.profiler.trace`` and sums the
device time of every kernel by name (``msa_jax.profiling``), so the launches of a step and
their share of its time can be read without TensorBoard. For a whole training step:
scripts/finetune.py --profile-step. Use it to see
where a step's time goes before optimising; numbers for claims come from scripts/benchmark.py.

Example:  python3 scripts/profile_step.py --decode-context 1048576 --prefill-context 131072
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp

from models import cli
import msa_jax
from msa_jax import profiling


def _inputs(key, b, t, s, hq=64, g=4, d=128, di=128, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 5)
  return (jax.random.normal(ks[0], (b, t, hq, d), dtype), jax.random.normal(ks[1], (b, s, g, d), dtype),
          jax.random.normal(ks[2], (b, s, g, d), dtype), jax.random.normal(ks[3], (b, t, g, di), dtype),
          jax.random.normal(ks[4], (b, s, di), dtype))


def profile(name, fn, args, calls, out_dir):
  jax.block_until_ready(fn(*args))  # compile
  trace_dir = os.path.join(out_dir, name)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
  rows = profiling.kernel_table(trace_dir, calls)
  print("\n" + profiling.markdown(name, rows))
  return {"name": name, "kernels": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--decode-context", type=int, default=1048576,
                      help="cache length of the decode step")
  parser.add_argument("--decode-batch", type=int, default=1, help="decode batch size")
  parser.add_argument("--prefill-context", type=int, default=131072,
                      help="context of the prefill chunk (its keys)")
  parser.add_argument("--prefill-chunk", type=int, default=65536,
                      help="queries of the prefill chunk (the last of --prefill-context)")
  parser.add_argument("--calls", type=int, default=10, help="traced calls per step")
  parser.add_argument("--implementation", default=None, choices=msa_jax.IMPLEMENTATIONS,
                      help="MSA implementation (default: the backend's best)")
  parser.add_argument("--interpret", action="store_true", help="interpret mode (CPU smoke)")
  parser.add_argument("--output-dir", default=None, help="traces and profile.json (default: temp)")
  args = parser.parse_args(argv)
  out_dir = args.output_dir or tempfile.mkdtemp()
  common = dict(implementation=args.implementation, interpret=args.interpret)
  results = []
  if args.decode_context:
    q, k, v, qi, ki = _inputs(jax.random.PRNGKey(0), args.decode_batch, 1, args.decode_context)
    step = jax.jit(lambda *a: msa_jax.msa_attention(*a, **common))
    results.append(profile("decode", step, (q, k, v, qi, ki), args.calls, out_dir))
  if args.prefill_context:
    n, c = args.prefill_context, min(args.prefill_chunk, args.prefill_context)
    q, k, v, qi, ki = _inputs(jax.random.PRNGKey(1), 1, c, n)
    pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
    chunk = jax.jit(lambda *a: msa_jax.msa_attention(*a, q_positions=pos, **common))
    results.append(profile("prefill_last_chunk", chunk, (q, k, v, qi, ki),
                           max(1, args.calls // 5), out_dir))
  with open(os.path.join(out_dir, "profile.json"), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "commit": cli.commit(), "results": results}, f,
              indent=1)
  return 0


run = cli.console_command(main)


if __name__ == "__main__":
  run()
