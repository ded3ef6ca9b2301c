"""Generation with a contiguous cache: chunked prefill, then decode in jitted blocks of steps.

``Generator`` is what ``scripts/generate.py`` runs for a static batch:

* The model is split once (``nnx.split``) and its steps are pure functions compiled ahead of
  time (``jit(...).lower(...).compile()``), so compile time is reported apart and no NNX graph
  is traversed per call. The caches are donated to every step: they are updated in place.
* **Prefill in chunks** of ``prefill_chunk`` tokens (one compiled width): prompts of different
  lengths run side by side, a row whose prompt has ended is left alone (``num_new`` 0), and
  only each row's last-token logits are kept (never ``[T, vocab]``). Long prompts fit because
  no layer builds ``[T, S]`` scores.
* **Decode in blocks**: one call runs up to ``decode_block`` steps in a ``lax.fori_loop``
  (sample on device, append, step the model) and returns the block's tokens; the host only
  streams them and checks for stop ids between blocks.

Sampling: greedy at temperature 0, else temperature and top-p (``sample``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import cache as cache_lib
from models import sharding


def check_sampling(temperature: float, top_p: float, top_k: int = 0):
  """``ValueError`` unless temperature is finite and >= 0, top_p is in [0, 1] and top_k is an
  integer >= 0."""
  import math
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got "
                     f"{temperature}")
  if not 0 <= top_p <= 1:  # also refuses NaN
    raise ValueError(f"top_p must lie in [0, 1] (0 keeps only the most likely token); got "
                     f"{top_p}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = no limit); got {top_k!r}")


def sample(logits, key, temperature: float, top_p: float, top_k: int = 0):
  """Next tokens [B] from logits [B, V]: greedy at temperature 0, else sampling from the
  ``top_k`` most likely tokens (0: all), then top-p (the smallest set of most likely tokens
  whose probability reaches top_p; the most likely token is always kept, so top_p 0 keeps
  only it)."""
  check_sampling(temperature, top_p, top_k)
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    first = jnp.arange(probs.shape[-1]) == 0
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p) | first  # the top token stays
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_new_tokens(n):
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"max_new_tokens must be an integer >= 0; got {n!r}")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class Timings:
  prefill_s: float = 0.0
  prefill_tokens: int = 0
  decode_s: float = 0.0
  decode_tokens: int = 0
  compile_s: float = 0.0  # ahead-of-time compilation, apart from the rates

  def as_dict(self) -> dict:
    rate = lambda n, s: n / s if s > 0 else None
    return {"prefill_s": self.prefill_s, "prefill_tokens": self.prefill_tokens,
            "prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_s),
            "decode_s": self.decode_s, "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": rate(self.decode_tokens, self.decode_s),
            "compile_s": self.compile_s}


class _CompiledSteps:
  """What both engines share: the model split once (``graphdef``, ``state``), step functions
  compiled ahead of time with the cache (argument 1) donated, and small inputs replicated
  over the mesh so every call matches the compiled layout."""

  def __init__(self, model, mesh):
    self.config = model.config
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    self.compile_s = 0.0
    self._compiled: dict[str, Callable] = {}

  def _put(self, x):
    """A small step input, replicated over the mesh (the layout the steps expect)."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh,
                                                        jax.sharding.PartitionSpec()))

  def _compile(self, name, fn, *args, cache_sharding=None):
    """Compile ``fn(state, cache, *rest)`` for ``args`` once per ``name``. Its outputs are
    (cache, small arrays...): the cache keeps ``cache_sharding``, the rest are replicated."""
    if name in self._compiled:
      return
    t0 = time.perf_counter()
    kw, context = {}, contextlib.nullcontext()
    if self.mesh is not None:
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      outputs = jax.eval_shape(fn, *args)
      kw["out_shardings"] = (cache_sharding,) + (replicated,) * (len(outputs) - 1)
      context = sharding.activation_sharding(self.mesh)
    with context:
      lowered = jax.jit(fn, donate_argnums=(1,), **kw).lower(*args)
    self._compiled[name] = lowered.compile()
    self.compile_s += time.perf_counter() - t0


class Generator(_CompiledSteps):
  """Static-batch generation for ``batch`` prompts of up to ``max_len`` tokens in all.

  Args:
    model: a ``models.MiniMaxM3`` (placed on ``mesh`` if given).
    batch: rows of the cache.
    max_len: cache length (prompt + new tokens); rounded up to a multiple of 128 so the
      decode kernels see the cache as whole pages without copying it.
    prefill_chunk: prompt tokens per prefill call (the compiled width).
    decode_block: decode steps per call.
    temperature, top_p, top_k: sampling (static: compiled into the decode loop).
    mesh: the device mesh of the model (None: one device).
  """

  def __init__(self, model, *, batch: int, max_len: int, prefill_chunk: int = 8192,
               decode_block: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, mesh=None):
    if prefill_chunk < 1 or decode_block < 1:
      raise ValueError(f"prefill_chunk and decode_block must be >= 1; got {prefill_chunk}, "
                       f"{decode_block}")
    check_sampling(float(temperature), float(top_p), top_k)
    super().__init__(model, mesh)
    self.dtype = model.dtype
    self.batch = batch
    self.max_len = round_up(max_len, 128)
    self.prefill_chunk = prefill_chunk
    self.decode_block = decode_block
    self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
    self.timings = Timings()

  # ------------------------------------------------------------------ compiled steps

  def _prefill_fn(self, state, cache, tokens, num_new, ends_here, last_logits):
    model = nnx.merge(self.graphdef, state)
    logits, cache = model(tokens, cache, num_new, last_only=True)
    return cache, jnp.where(ends_here[:, None], logits, last_logits)

  def _decode_fn(self, state, cache, logits, key, steps):
    model = nnx.merge(self.graphdef, state)

    def body(i, carry):
      cache, logits, key, out = carry
      key, sub = jax.random.split(key)
      token = sample(logits, sub, self.temperature, self.top_p, self.top_k)
      out = out.at[:, i].set(token)
      logits, cache = model(token[:, None], cache, last_only=True)
      return cache, logits, key, out

    out = jnp.zeros((self.batch, self.decode_block), jnp.int32)
    cache, logits, key, out = jax.lax.fori_loop(0, steps, body, (cache, logits, key, out))
    return cache, logits, key, out

  # ------------------------------------------------------------------ public

  def init_cache(self):
    cache = cache_lib.init_cache(self.config, self.batch, self.max_len, self.dtype)
    if self.mesh is not None:
      cache = jax.device_put(cache, sharding.cache_shardings(cache, self.mesh))
    return cache

  def compile(self, cache, steps=("prefill", "decode")):
    """Compile the prefill chunk and the decode block now (``timings.compile_s``)."""
    w, b, v = self.prefill_chunk, self.batch, self.config.vocab_size
    put = self._put
    layout = sharding.cache_shardings(cache, self.mesh) if self.mesh is not None else None
    before = self.compile_s
    if "prefill" in steps:
      self._compile("prefill", self._prefill_fn, self.state, cache,
                    put(np.zeros((b, w), np.int32)), put(np.zeros((b,), np.int32)),
                    put(np.zeros((b,), bool)), put(np.zeros((b, v), np.float32)),
                    cache_sharding=layout)
    if "decode" in steps:
      self._compile("decode", self._decode_fn, self.state, cache,
                    put(np.zeros((b, v), np.float32)), put(jax.random.PRNGKey(0)),
                    put(np.int32(1)), cache_sharding=layout)
    self.timings.compile_s += self.compile_s - before

  def prefill(self, prompts: Sequence[Sequence[int]], cache, *, progress=None):
    """Prefill ``prompts`` (one per row, ``<= batch``) into an empty ``cache`` in chunks.

    Returns (last-token logits [batch, V] float32, cache). ``progress(done, total)`` is
    called after each chunk."""
    if len(prompts) > self.batch:
      raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
    lengths = np.zeros(self.batch, np.int64)
    lengths[:len(prompts)] = [len(p) for p in prompts]
    if lengths.max(initial=0) > self.max_len:
      raise ValueError(f"a prompt of {lengths.max()} tokens does not fit the cache of "
                       f"{self.max_len}")
    self.compile(cache, steps=("prefill",))
    w = self.prefill_chunk
    total = int(lengths.max(initial=0))
    put = self._put
    logits = put(np.zeros((self.batch, self.config.vocab_size), np.float32))
    for start in range(0, total, w):
      tokens = np.zeros((self.batch, w), np.int32)
      for b, p in enumerate(prompts):
        piece = p[start:start + w]
        tokens[b, :len(piece)] = piece
      num_new = np.clip(lengths - start, 0, w).astype(np.int32)
      ends_here = (lengths > start) & (lengths <= start + w)
      t0 = time.perf_counter()
      cache, logits = self._compiled["prefill"](self.state, cache, put(tokens), put(num_new),
                                                put(ends_here), logits)
      logits.block_until_ready()
      self.timings.prefill_s += time.perf_counter() - t0
      self.timings.prefill_tokens += int(num_new.sum())
      if progress is not None:
        progress(min(start + w, total), total)
    return logits, cache

  def decode(self, logits, cache, *, max_new_tokens: int, seed: int = 0,
             stop_ids: Sequence[int] = (), on_block=None):
    """Sample ``max_new_tokens`` tokens per row after ``logits`` (the prefill's).

    Returns (tokens [batch, n] int numpy array, cache); a row that produced a stop id keeps
    it as its last token (the rest of its row is padding, cut by the caller: see
    ``trim``); decoding ends early when every row has stopped. ``on_block(tokens)`` is called
    with each block's ``[batch, steps]`` tokens as they arrive.
    """
    _check_new_tokens(max_new_tokens)
    self.compile(cache, steps=("decode",))
    key = self._put(jax.random.PRNGKey(seed))
    blocks = []
    stopped = np.zeros(self.batch, bool)
    done = 0
    while done < max_new_tokens and not stopped.all():
      steps = min(self.decode_block, max_new_tokens - done)
      t0 = time.perf_counter()
      cache, logits, key, out = self._compiled["decode"](self.state, cache, logits, key,
                                                         self._put(np.int32(steps)))
      host = np.asarray(out)[:, :steps]  # waits for the block
      self.timings.decode_s += time.perf_counter() - t0
      self.timings.decode_tokens += steps * self.batch
      blocks.append(host)
      done += steps
      if stop_ids:
        stopped |= np.isin(host, list(stop_ids)).any(axis=1)
      if on_block is not None:
        on_block(host)
    tokens = np.concatenate(blocks, axis=1) if blocks else np.zeros((self.batch, 0), np.int32)
    return tokens, cache


def trim(tokens: np.ndarray, stop_ids: Sequence[int] = ()) -> list[list[int]]:
  """Rows of generated tokens, each cut after its first stop id."""
  rows = []
  for row in np.asarray(tokens).tolist():
    for i, t in enumerate(row):
      if t in stop_ids:
        row = row[:i + 1]
        break
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- continuous batching


@dataclasses.dataclass
class ServeResult:
  generated: list[list[int]]
  records: list[dict]
  timings: dict


class PagedServer(_CompiledSteps):
  """Continuous batching over a paged cache: ``rows`` batch rows, ``num_pages`` pages.

  Requests (prompts) wait in a queue; one is admitted when a row is free and pages for its
  prompt plus ``max_new_tokens`` can be reserved (``msa_jax.PageAllocator``), is prefilled in
  chunks of one compiled width while the other rows wait, then decodes with them and leaves
  when it has its tokens or produced a stop id. A request that could never fit is refused.

  Decoding runs in blocks (one jitted ``fori_loop`` of up to ``decode_block`` steps, sampling
  on the device): a block ends when the first row could finish, so admissions happen at the
  step they would without blocks. Steps are compiled ahead of time with the cache donated.
  """

  def __init__(self, model, *, rows: int, num_pages: int, max_pages: int, prefill_width: int,
               decode_block: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, mesh=None):
    import msa_jax
    check_sampling(float(temperature), float(top_p), top_k)
    super().__init__(model, mesh)
    self.rows, self.width = rows, prefill_width
    self.decode_block = decode_block
    self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
    bk = self.config.index_block_size
    self.alloc = msa_jax.PageAllocator(num_pages, bk, rows, max_pages)
    self.num_pages = num_pages
    cache = cache_lib.init_paged_cache(self.config, num_pages=num_pages, batch=rows,
                                       max_pages=max_pages, dtype=model.dtype)
    self.layout = (sharding.paged_cache_shardings(cache, mesh) if mesh is not None else None)
    self.cache = jax.device_put(cache, self.layout) if mesh is not None else cache

  def _prefill_fn(self, state, cache, tokens, num_new, key):
    model = nnx.merge(self.graphdef, state)
    logits, cache = model(tokens, cache, num_new, last_only=True)
    return cache, sample(logits, key, self.temperature, self.top_p, self.top_k)

  def _decode_fn(self, state, cache, tokens, active, key, steps):
    model = nnx.merge(self.graphdef, state)
    num_new = active.astype(jnp.int32)

    def body(i, carry):
      cache, tokens, key, out = carry
      logits, cache = model(tokens[:, None], cache, num_new, last_only=True)
      key, sub = jax.random.split(key)
      nxt = sample(logits, sub, self.temperature, self.top_p, self.top_k)
      tokens = jnp.where(active, nxt, tokens)
      return cache, tokens, key, out.at[:, i].set(nxt)

    out = jnp.zeros((self.rows, self.decode_block), jnp.int32)
    cache, _, key, out = jax.lax.fori_loop(0, steps, body, (cache, tokens, key, out))
    return cache, out

  def compile(self):
    """Compile the prefill chunk and the decode block (``compile_s``)."""
    r, put = self.rows, self._put
    key = put(jax.random.PRNGKey(0))
    self._compile("prefill", self._prefill_fn, self.state, self.cache,
                  put(np.zeros((r, self.width), np.int32)), put(np.zeros(r, np.int32)), key,
                  cache_sharding=self.layout)
    self._compile("decode", self._decode_fn, self.state, self.cache, put(np.zeros(r, np.int32)),
                  put(np.zeros(r, bool)), key, put(np.int32(1)), cache_sharding=self.layout)

  def serve(self, prompts, *, max_new_tokens: int, seed: int = 0, stop_ids=(),
            on_tokens=None, on_refused=None) -> ServeResult:
    """Serve ``prompts`` as requests; ``on_tokens(step, {request: [tokens]})`` streams.
    ``on_refused(request, reason)`` is called for a request that can never fit."""
    _check_new_tokens(max_new_tokens)
    if any(not p for p in prompts):
      raise ValueError("every prompt needs at least one token")
    self.compile()
    run = _ServeRun(self, prompts, max_new_tokens, seed, set(stop_ids), on_tokens, on_refused)
    while run.queue or run.active:
      admitted = run.admit()
      if admitted:  # prefill the newcomers chunk by chunk; the other rows are left alone
        run.prefill(admitted)
      if run.active:  # a block of decode steps for every live request
        run.decode_block()
      elif run.queue and not admitted:
        raise RuntimeError("requests wait but nothing runs")  # cannot happen: see admit
    return run.result()


class _ServeRun:
  """One ``PagedServer.serve`` call: the queue, the rows' requests, their tokens and
  timings, and the three moves of the loop (admit, prefill the admitted, a decode block)."""

  def __init__(self, server, prompts, max_new_tokens, seed, stop_ids, on_tokens, on_refused):
    self.server, self.prompts, self.max_new_tokens = server, prompts, max_new_tokens
    self.stop_ids, self.on_tokens, self.on_refused = stop_ids, on_tokens, on_refused
    self.budget = [len(p) + max_new_tokens for p in prompts]
    self.queue = list(range(len(prompts)))
    self.active: dict[int, int] = {}  # row -> request
    self.generated = [[] for _ in prompts]
    self.records = [{"request": i, "prompt_len": len(p)} for i, p in enumerate(prompts)]
    self.next_token = np.zeros(server.rows, np.int32)
    self.key = server._put(jax.random.PRNGKey(seed))  # pylint: disable=protected-access
    self.step = 0
    self.freed = []  # rows freed since the last sync
    self.t = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0,
              "tokens": 0}

  def _put(self, x):
    return self.server._put(x)  # pylint: disable=protected-access

  def _subkey(self):
    self.key, sub = jax.random.split(self.key)
    return sub

  def sync(self, reset_rows=()):
    """The allocator's page table to the device; new and freed rows get length 0."""
    srv = self.server
    lengths = srv.cache.lengths
    reset = list(reset_rows) + self.freed
    if reset:
      lengths = self._put(np.where(np.isin(np.arange(srv.rows), reset), 0,
                                   np.asarray(lengths)).astype(np.int32))
      self.freed.clear()
    srv.cache = srv.cache._replace(page_table=self._put(srv.alloc.page_table.copy()),
                                   lengths=lengths)

  def emit(self, row, tokens, at_step):
    """Record ``tokens`` (until a stop) for the request in ``row``; free it when done."""
    i = self.active[row]
    kept = []
    for tok in tokens:
      if len(self.generated[i]) >= self.max_new_tokens:
        break
      kept.append(int(tok))
      self.generated[i].append(int(tok))
      if int(tok) in self.stop_ids:
        break
    self.t["tokens"] += len(kept)
    if self.on_tokens is not None and kept:
      self.on_tokens(at_step, {i: kept})
    if kept:
      self.next_token[row] = kept[-1]
    if len(self.generated[i]) >= self.max_new_tokens or (kept and kept[-1] in self.stop_ids):
      self.records[self.active.pop(row)]["finished_step"] = at_step + max(len(kept), 1) - 1
      self.server.alloc.free(row)
      self.freed.append(row)

  def admit(self) -> list[int]:
    """Rows given to queued requests while rows and pages last (in order); requests that
    can never fit are refused."""
    srv, admitted = self.server, []
    alloc = srv.alloc
    while self.queue:
      i = self.queue[0]
      if alloc.pages_for(self.budget[i]) > srv.num_pages:
        self.queue.pop(0)
        self.records[i]["refused"] = (
            f"needs {alloc.pages_for(self.budget[i])} pages of "
            f"{srv.config.index_block_size} tokens (prompt {len(self.prompts[i])} + "
            f"{self.max_new_tokens} new); the cache has {srv.num_pages}")
        if self.on_refused is not None:
          self.on_refused(i, self.records[i]["refused"])
        continue
      row = alloc.admit(len(self.prompts[i]), reserve_tokens=self.budget[i])
      if row is None:  # no free row or pages: wait for a request to leave
        break
      self.queue.pop(0)
      self.active[row] = i
      admitted.append(row)
      self.records[i].update(row=row, admitted_step=self.step)
    return admitted

  def prefill(self, admitted):
    """The admitted rows' prompts, chunk by chunk; each prompt's last chunk gives its first
    token."""
    srv = self.server
    self.sync(admitted)
    prompt_of = {r: self.prompts[self.active[r]] for r in admitted}
    for start in range(0, max(map(len, prompt_of.values())), srv.width):
      tokens = np.zeros((srv.rows, srv.width), np.int32)
      num_new = np.zeros(srv.rows, np.int32)
      for r, p in prompt_of.items():
        chunk = p[start:start + srv.width]
        tokens[r, :len(chunk)], num_new[r] = chunk, len(chunk)
      sub = self._subkey()
      t0 = time.perf_counter()
      srv.cache, first = srv._compiled["prefill"](  # pylint: disable=protected-access
          srv.state, srv.cache, self._put(tokens), self._put(num_new), sub)
      first = np.asarray(first)
      self.t["prefill_s"] += time.perf_counter() - t0
      self.t["prefill_tokens"] += int(num_new.sum())
      for r, p in list(prompt_of.items()):
        if start < len(p) <= start + srv.width:
          self.emit(r, [first[r]], self.step)
      self.step += 1

  def decode_block(self):
    """Up to ``decode_block`` decode steps for every live request in one device call."""
    srv = self.server
    rows = sorted(self.active)
    left = min(self.max_new_tokens - len(self.generated[self.active[r]]) for r in rows)
    steps = min(srv.decode_block, left)
    for r in rows:  # pages for the block's tokens (within the reservation)
      have = len(self.prompts[self.active[r]]) + len(self.generated[self.active[r]])
      if not srv.alloc.grow(r, have + steps - 1):
        raise RuntimeError("a reserved page was not available")  # the allocator's promise
    live = np.zeros(srv.rows, bool)
    live[rows] = True
    self.sync()
    sub = self._subkey()
    t0 = time.perf_counter()
    srv.cache, out = srv._compiled["decode"](  # pylint: disable=protected-access
        srv.state, srv.cache, self._put(self.next_token), self._put(live), sub,
        self._put(np.int32(steps)))
    out = np.asarray(out)[:, :steps]
    self.t["decode_s"] += time.perf_counter() - t0
    before = self.t["tokens"]
    for r in rows:
      self.emit(r, out[r], self.step)
    self.t["decode_tokens"] += self.t["tokens"] - before
    self.step += steps

  def result(self) -> ServeResult:
    srv, t = self.server, self.t
    rate = lambda n, s: n / s if s else None
    timings = {"prefill_tokens_per_s": rate(t["prefill_tokens"], t["prefill_s"]),
               "decode_tokens_per_s": rate(t["decode_tokens"], t["decode_s"]),
               "prefill_s": t["prefill_s"], "decode_s": t["decode_s"], "steps": self.step,
               "num_pages": srv.num_pages, "max_batch": srv.rows,
               "compile_s": srv.compile_s, "includes_compilation": False}
    return ServeResult(self.generated, self.records, timings)
