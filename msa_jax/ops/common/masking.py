"""What keys a query cannot see must not reach its output, even as NaN or Inf.

Shared by the KV-outer forward kernels (Triton and Mosaic TPU lowerings: only elementwise
ops, comparisons and reductions). A K/V block is shared by the rows of a tile whose queries
sit at different positions, so a value row that one query may not see cannot simply be
zeroed for all of them, and ``0 * NaN`` in ``P @ V`` is NaN. Instead:

* ``clean_values``: every non-finite value row, and every row past ``kv_len`` (unwritten
  cache), is zeroed once per block; the block remembers which keys held non-finite values.
* ``finalize``: after ``P @ V``, a row that *sees* such a key gets a NaN output, like the
  exact computation (its LSE, a function of the logits, stays); rows that do not see it are
  unaffected. A row whose logits hold a
  NaN or +Inf (a visible NaN/Inf key) has ``l`` NaN and also gets NaN out and LSE: "no
  visible key" is ``l == 0`` only.
"""

from __future__ import annotations

import jax.numpy as jnp


def clean_values(v, key_col, kv_len):
  """``v [Bk, D]`` with rows past ``kv_len`` and non-finite rows zeroed, and a float
  ``[Bk, 1]`` flag, 1 where a row (before ``kv_len``) held a NaN or Inf. ``key_col`` is the
  ``[Bk, 1]`` key positions."""
  finite = (v == v) & (jnp.abs(v) < jnp.inf)
  live = key_col < kv_len
  bad = jnp.max(jnp.where(finite, 0.0, 1.0), axis=1, keepdims=True)
  bad = jnp.where(live, bad, 0.0)
  return jnp.where(finite & live, v, jnp.zeros((), v.dtype)), bad


def finalize(acc, m, l, sees_bad=None):
  """Normalised output and LSE of an online softmax: ``acc [rows, Dv]``, ``m`` and ``l``
  ``[rows]`` or ``[rows, 1]``. ``l == 0``: no visible key (out 0, LSE -inf); ``l`` NaN: NaN
  out and LSE; ``sees_bad`` (same shape as ``l``, > 0 where a visible value was non-finite):
  NaN out."""
  has = l != 0  # NaN != 0: a NaN row is not "empty"
  safe = jnp.where(has, l, 1.0)
  o = acc / (safe if safe.ndim == acc.ndim else safe[:, None])
  lse = jnp.where(has, m + jnp.log(safe), -jnp.inf)
  if sees_bad is not None:  # the LSE depends on the logits only: it stays
    nan = sees_bad > 0
    o = jnp.where(nan if nan.ndim == o.ndim else nan[:, None], jnp.nan, o)
  return o, lse
