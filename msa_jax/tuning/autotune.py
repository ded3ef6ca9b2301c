"""The autotuner: sweep the GPU kernels' launch parameters and keep the fastest.

Each section of ``msa_jax.tuning.DEFAULTS`` that has a grid here is timed on one
representative shape (the last ``chunk`` queries of a ``context``-token prefill; decode: one
query against ``decode_context`` keys), each configuration traced and compiled once under
``tuning.override`` and then timed; configurations the compiler rejects are reported and
skipped. ``scripts/benchmark.py --tune`` runs it and stores the winners as the card's data
(``tuning.save``)::

    report = autotune.tune(workloads.M3, context=131072, chunk=16384, decode_context=1 << 20,
                           path_chunk=65536, on_best=lambda best: tuning.save(kind, best))
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax.ops.sparse_attention import paths as sparse_paths
from msa_jax import reference
from msa_jax import schedule as sched
from msa_jax import tuning
from msa_jax.profiling import block, timed
from msa_jax.workloads import Workload

# The sweeps of a full run. "index": selection "mosaic" (ops/index_topk/gpu_mosaic.py) reads only
# mosaic_stages, the others only the Triton keys. "sparse": kernel Triton or Mosaic GPU
# (ops/sparse_attention/gpu_mosaic.py: tile_rows per compute warpgroup, tiles_per_item = compute
# warpgroups; items_per_program, num_warps, num_stages are Triton's only; kv_stages and
# q_stages, the Mosaic kernel's rings, can be swept through a custom grid). "sparse_path": the
# whole sparse path (schedule, kernel, combine) on the last ``path_chunk`` queries, in pieces of
# query_chunk queries, after "sparse" chose its kernel.
GRIDS = {
    "index": dict(selection=["scores", "tile", "fused", "mosaic"], block_rows=[64, 128],
                  blocks_per_tile=[16, 32, 64], num_warps=[4, 8], num_stages=[2],
                  mosaic_stages=[2, 3, 4]),
    "sparse": dict(kernel=["triton", "mosaic"], tile_rows=[32, 64, 128], tiles_per_item=[1, 2],
                   items_per_program=[1, 4], num_warps=[4, 8], num_stages=[3]),
    "index_decode": dict(selection=["scores", "tile", "mosaic"], blocks_per_tile=[16, 32, 64],
                         num_stages=[2, 4]),
    "sparse_path": dict(query_chunk=[None, 32768, 16384, 8192, 4096]),
}
# Tiny sweeps for CPU interpret runs (tests of the tuner itself).
SMOKE_GRIDS = {
    "index": dict(selection=["scores", "tile", "fused"], block_rows=[16, 32], blocks_per_tile=[4]),
    "sparse": dict(tiles_per_item=[1, 2], items_per_program=[1, 2]),
    "index_decode": dict(selection=["scores", "tile"]),
    "sparse_path": dict(query_chunk=[None, 32]),
}
# Keys of the "sparse" grid that only the Mosaic GPU kernel reads.
MOSAIC_ONLY = ("kv_stages", "q_stages")
TRITON_ONLY = ("items_per_program", "num_warps", "num_stages")


def section_shapes(context: int, chunk: int, decode_context: int) -> dict:
  """{section: the shape its winner was timed at} for ``tuning.save``."""
  prefill = tuning.shape(context, chunk)
  return {"index": prefill, "sparse": prefill, "sparse_mosaic": prefill,
          "index_decode": tuning.shape(decode_context, 1)}


def check_grids(grids: dict) -> dict:
  """``grids`` ({section: {key: values}}) with lists for values; ``ValueError`` for unknown
  sections."""
  unknown = set(grids) - set(GRIDS)
  if unknown:
    raise ValueError(f"unknown tuning grids {sorted(unknown)}; known: {sorted(GRIDS)}")
  return {name: {key: list(vals) for key, vals in grid.items()} for name, grid in grids.items()}


def tune(w: Workload, *, context: int, chunk: int, decode_context: int, path_chunk: int,
         grids: dict | None = None, iters: int = 10, interpret=False,
         on_best: Callable[[dict], None] | None = None, log=print) -> dict:
  """Sweep ``grids`` (default ``GRIDS``) on workload ``w``; returns {section: {"trials",
  "best"}, "shape": ...}. ``on_best(best)`` gets the winners so far ({section: parameters})
  after each section, so a sweep cut short keeps what it found. ``log`` gets one JSON line
  per trial."""
  grids = check_grids(GRIDS if grids is None else grids)
  bench = _Bench(w, context=context, chunk=min(chunk, context), decode_context=decode_context,
                 path_chunk=path_chunk, interpret=interpret)
  runners = {"index": bench.index, "sparse": bench.sparse, "index_decode": bench.index_decode,
             "sparse_path": bench.sparse_path}
  report, best = {}, {}
  for section, grid in grids.items():
    trials = _sweep(section, grid, runners[section], iters, log)
    ok = [t for t in trials if "ms" in t]
    if ok:
      fastest = min(ok, key=lambda t: t["ms"])["config"]
      if section == "sparse_path":  # keys of the "sparse" entry
        best["sparse"] = dict(best.get("sparse") or dataclasses.asdict(tuning.config("sparse")),
                              **fastest)
      else:
        best[section] = dict(tuning.fields(section), **fastest)
        if section == "sparse":
          best.update(sparse_best(ok))
      if on_best is not None:
        on_best(best)
    report[section] = {"trials": trials, "best": best.get(section)}
  report["shape"] = {"context": context, "chunk": bench.chunk, "decode_context": decode_context}
  return report


def _sweep(section, grid, runner, iters, log) -> list[dict]:
  """Time ``runner(cfg)`` for every configuration of ``grid`` (skipping values of keys the
  configuration's kernel ignores)."""
  trials = []
  for values in itertools.product(*grid.values()):
    cfg = dict(zip(grid.keys(), values))
    if _redundant(section, cfg, grid):
      continue
    try:
      ms, _ = timed(runner(cfg), iters=iters, budget_s=1)
      trials.append({"config": cfg, "ms": ms})
    except Exception as e:  # pylint: disable=broad-except  # a config the compiler rejects
      trials.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    log(json.dumps({"kernel": section, **trials[-1]}))
  return trials


def _redundant(section, cfg, grid) -> bool:
  """Whether ``cfg`` sets a key its kernel ignores to other than the grid's first value
  (timed once, not per value)."""
  if section == "sparse":
    ignored = TRITON_ONLY if cfg.get("kernel") == "mosaic" else MOSAIC_ONLY
  elif section in ("index", "index_decode"):
    ignored = (("block_rows", "blocks_per_tile", "num_warps", "num_stages")
               if cfg.get("selection") == "mosaic" else ("mosaic_stages",))
  else:
    return False
  return any(n in cfg and cfg[n] != grid[n][0] for n in ignored)


def sparse_best(ok: list[dict]) -> dict:
  """The "sparse" entry (Triton's best launch parameters, "kernel" = the faster kernel) and
  the "sparse_mosaic" entry (the Mosaic kernel's best tiles), from the timed sparse trials."""
  fastest = lambda trials: min(trials, key=lambda t: t["ms"])["config"]
  winner = fastest(ok).get("kernel", "triton")
  triton = [t for t in ok if t["config"].get("kernel", "triton") == "triton"]
  mosaic = [t for t in ok if t["config"].get("kernel") == "mosaic"]
  # Without Triton trials (a grid of the Mosaic kernel alone) its table entry stays.
  launch = ({k: v for k, v in fastest(triton).items() if k not in MOSAIC_ONLY} if triton
            else dataclasses.asdict(tuning.config("sparse")))
  best = {"sparse": dict(tuning.fields("sparse"), **launch)}
  best["sparse"]["kernel"] = winner
  if mosaic:
    cfg = fastest(mosaic)
    best["sparse_mosaic"] = dict(tuning.fields("sparse_mosaic"), tile_rows=cfg["tile_rows"],
                                 tiles_per_item=cfg["tiles_per_item"],
                                 **{k: cfg[k] for k in MOSAIC_ONLY if k in cfg})
    if "q_stages" in best["sparse_mosaic"]:
      best["sparse_mosaic"]["num_stages"] = best["sparse_mosaic"].pop("q_stages")
  return best


class _Bench:
  """The inputs of the sweeps and one runner per section: ``runner(cfg)`` traces and
  compiles under ``tuning.override`` and returns a blocking call to time."""

  def __init__(self, w: Workload, *, context, chunk, decode_context, path_chunk, interpret):
    self.w, self.interpret = w, interpret
    self.context, self.chunk, self.path_chunk = context, chunk, min(path_chunk, context)
    dtype = jnp.dtype(w.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    rnd = lambda key, shape: jax.random.normal(key, shape, dtype)
    n, c = context, chunk
    self.q = rnd(keys[0], (1, c, w.q_heads, w.head_dim))
    self.k = rnd(keys[1], (1, n, w.groups, w.head_dim))
    self.v = rnd(keys[2], (1, n, w.groups, w.head_dim))
    self.q_idx = rnd(keys[3], (1, c, w.groups, w.index_dim))
    self.k_idx = rnd(keys[4], (1, n, w.index_dim))
    self.pos = (n - c + jnp.arange(c, dtype=jnp.int32))[None]
    self.kvl = jnp.array([n], jnp.int32)
    # Decode: one query per sequence against a long cache (batch 1: the launch-bound case).
    self.q_idx_decode = rnd(keys[3], (1, 1, w.groups, w.index_dim))
    self.k_idx_decode = rnd(keys[4], (1, decode_context, w.index_dim))
    self.ids = self._select(self.q_idx, self.pos)
    self.num_blocks = reference.cdiv(n, w.block_size)
    self.valid = reference.valid_block_mask(self.ids, self.num_blocks)
    self._build = jax.jit(sched.build_schedule, static_argnums=(3, 4))
    self._reference_head = None
    self._path = None

  def _select(self, q_idx, pos, k_idx=None, kv_lengths=None):
    w = self.w
    return msa_jax.index_topk(q_idx, self.k_idx if k_idx is None else k_idx,
                              block_size=w.block_size, topk=w.topk, q_positions=pos,
                              kv_lengths=self.kvl if kv_lengths is None else kv_lengths,
                              implementation="pallas_gpu", interpret=self.interpret)

  def _traced(self, section, cfg, fn, *args):
    """``fn`` jitted and compiled under the override; a blocking call of it."""
    f = jax.jit(fn)
    with tuning.override(section, **cfg):
      block(f(*args))
    return lambda: block(f(*args))

  def index(self, cfg):  # the whole selection
    return self._traced("index", cfg, lambda a, b: self._select(a, self.pos, b), self.q_idx,
                        self.k_idx)

  def index_decode(self, cfg):
    n = self.k_idx_decode.shape[1]
    return self._traced("index_decode", cfg,
                        lambda a, b: self._select(a, None, b, jnp.array([n], jnp.int32)),
                        self.q_idx_decode, self.k_idx_decode)

  def sparse(self, cfg):  # the kernel alone, on a schedule built for its item size
    if cfg.get("kernel") == "mosaic":  # never pick a kernel that disagrees with Triton's
      if self._reference_head is None:
        self._reference_head = self._combined_head({"tiles_per_item": 1})
      (out, lse), (want_out, want_lse) = self._combined_head(cfg), self._reference_head
      err = float(jnp.linalg.norm(out - want_out) / jnp.linalg.norm(want_out))
      lse_err = float(jnp.max(jnp.where(jnp.isfinite(want_lse), jnp.abs(lse - want_lse), 0)))
      if not (err <= 2e-2 and lse_err <= 1e-2):
        raise ValueError(f"mosaic != triton: out rel. err {err:.2e}, LSE err {lse_err:.2e}")
    f, schedule = self._partials(cfg)
    one = jax.jit(lambda *a: f(*a)[1][0, 0, 0, 0])  # one element: no copy of the partials
    return lambda: block(one(self.q, self.k, self.v, schedule))

  def _partials(self, cfg):
    """(jitted partials function, schedule) of the sparse kernel ``cfg`` names."""
    from msa_jax.ops.sparse_attention import gpu_mosaic, gpu_triton
    w, cfg = self.w, dict(cfg)
    module = gpu_triton
    if cfg.pop("kernel", "triton") == "mosaic":
      if self.interpret:
        raise NotImplementedError("the Mosaic GPU kernel is not swept in interpret mode")
      module = gpu_mosaic
      for name in TRITON_ONLY:
        cfg.pop(name, None)
      if "q_stages" in cfg:  # the Mosaic kernel's q/O slots (its num_stages)
        cfg["num_stages"] = cfg.pop("q_stages")
    else:
      for name in MOSAIC_ONLY:
        cfg.pop(name, None)
    tile_rows = cfg.pop("tile_rows", None)
    if self.interpret:
      tile_rows = sparse_paths.INTERPRET_TILE_ROWS
    per_tile, per_item = module.work_item_size(
        w.q_heads // w.groups, tile_rows=tile_rows, tiles_per_item=cfg.pop("tiles_per_item"))
    schedule = self._build(self.ids, self.valid, self.pos, self.num_blocks, per_item)
    f = jax.jit(lambda q, k, v, s: module.sparse_attention_partials(
        q, k, v, s, self.kvl, block_size=w.block_size, scale=1 / math.sqrt(w.head_dim),
        topk=w.topk, queries_per_tile=per_tile, tiles_per_item=per_item // per_tile,
        interpret=self.interpret, **cfg))
    return f, schedule

  def _combined_head(self, cfg):
    """The first queries' combined output and LSE (to compare kernels)."""
    f, schedule = self._partials(cfg)
    p_out, p_lse = f(self.q, self.k, self.v, schedule)
    m = min(self.chunk, 1024)
    return sched.combine(p_out[:, :, :m], p_lse[:, :, :m], self.valid[:, :m], jnp.float32)

  def sparse_path(self, cfg):  # schedule + kernel + combine on a longer chunk
    w = self.w
    if self._path is None:
      n, cp = self.context, self.path_chunk
      pos = (n - cp + jnp.arange(cp, dtype=jnp.int32))[None]
      keys = jax.random.split(jax.random.PRNGKey(1), 2)
      dtype = jnp.dtype(w.dtype)
      q_idx = jax.random.normal(keys[1], (1, cp, w.groups, w.index_dim), dtype)
      self._path = dict(q=jax.random.normal(keys[0], (1, cp, w.q_heads, w.head_dim), dtype),
                        pos=pos, ids=self._select(q_idx, pos))
    x = self._path
    return self._traced("sparse", cfg, lambda q, k, v, ids: msa_jax.sparse_attention(
        q, k, v, ids, q_positions=x["pos"], kv_lengths=self.kvl, block_size=w.block_size,
        implementation="pallas_gpu", interpret=self.interpret), x["q"], self.k, self.v, x["ids"])
