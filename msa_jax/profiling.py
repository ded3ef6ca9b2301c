"""Where device time goes: wall-clock timing of blocking calls (``timed``) and per-kernel
totals from a ``jax.profiler`` trace.

``kernel_table`` reads the Perfetto trace that ``jax.profiler.trace(dir,
create_perfetto_trace=True)`` writes and sums the device time of every kernel by name, so the
launches of a step and their share of its time can be read without TensorBoard. Used by
scripts/profile_step.py (attention alone) and scripts/finetune.py --profile-step (a whole
training step). Numbers for claims come from scripts/benchmark.py, not from traces.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import time

import jax


def timed(fn, *, iters: int, budget_s: float):
  """Median wall time (ms) of ``fn()`` (which must block), after one warm-up call.

  Runs at most ``iters`` timed calls and fewer when one call is slow, so that the timed calls
  take about ``budget_s``; always at least one.
  """
  fn()
  times = []
  while len(times) < iters:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if sum(times) > budget_s:
      break
  return statistics.median(times) * 1e3, len(times)


def block(x):
  """``x`` once the device has computed it."""
  return jax.block_until_ready(x)


def kernel_table(trace_dir: str, calls: int, top: int = 30, device: str = "GPU") -> list[dict]:
  """Kernel name -> total device microseconds per call, from the profiler's Perfetto trace.

  Only events of processes whose name contains ``device`` count ("GPU": the device streams).
  Returns rows ``{"kernel", "us_per_call", "launches_per_call"}``, largest first; [] when the
  trace has none (e.g. on CPU).
  """
  paths = (glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
           or glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    return []
  with gzip.open(sorted(paths)[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  totals, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    if device not in names.get(e.get("pid"), ""):
      continue
    totals[e["name"]] += float(e.get("dur", 0))
    counts[e["name"]] += 1
  return [{"kernel": n[:90], "us_per_call": totals[n] / calls,
           "launches_per_call": counts[n] / calls} for n, _ in totals.most_common(top)]


def markdown(name: str, rows: list[dict]) -> str:
  """A markdown table of ``kernel_table`` rows under a heading with their total."""
  total = sum(r["us_per_call"] for r in rows)
  out = [f"## {name}: {total:.1f} us of device time per call in the top kernels",
         "| kernel | us per call | launches per call |", "|---|---|---|"]
  out += [f"| {r['kernel']} | {r['us_per_call']:.1f} | {r['launches_per_call']:.1f} |"
          for r in rows]
  return "\n".join(out)
