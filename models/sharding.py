"""Logical-axis sharding: names on parameters and activations, one rule table to mesh axes.

Every parameter carries ``logical_axes`` metadata (e.g. ``("embed", "q_heads")``).
``RULES`` maps each logical name to a mesh axis (``data``, ``fsdp``, ``tensor``, ``expert``)
or None; changing the mesh (and, if wanted, the rules) is all it takes to run the same model
unsharded, tensor-parallel over heads/MLP width, or expert-parallel over experts. Mesh axes
missing from the mesh are ignored, so one table serves every mesh.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "index_heads": "tensor",
    "index_dim": None,
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "norm": None,
    "embed_norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed_act": None,
    "cache_heads": "tensor",
}

_active: dict = {}


def make_mesh(axes: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with named axes, e.g. ``{"data": 2, "tensor": 4}`` (Auto axis types: the
  compiler inserts the collectives the rules imply)."""
  devices = jax.devices() if devices is None else devices
  n = 1
  for size in axes.values():
    n *= size
  if n > len(devices):
    raise ValueError(f"mesh {dict(axes)} needs {n} devices; {len(devices)} available")
  return jax.make_mesh(tuple(axes.values()), tuple(axes.keys()), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def parse_mesh(text: str | None, default: Mapping[str, int]) -> dict[str, int]:
  """A command line's ``--mesh``: ``"data=2,tensor=4"`` -> {"data": 2, "tensor": 4}; empty or
  None gives ``default``. Bad input exits with a message."""
  if not text:
    return dict(default)
  axes = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if name not in ("data", "fsdp", "tensor", "expert") or not size.isdigit():
      raise SystemExit(f"--mesh: expected name=size with names data/fsdp/tensor/expert, "
                       f"got {part!r}")
    if int(size) < 1:
      raise SystemExit(f"--mesh: axis sizes must be >= 1; got {part!r}")
    axes[name] = int(size)
  return axes


def spec(logical_axes, mesh: jax.sharding.Mesh, rules: Mapping = RULES) -> P:
  """PartitionSpec for ``logical_axes`` on ``mesh``; a mesh axis is used at most once."""
  used, out = set(), []
  for name in logical_axes:
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in used
                 and mesh.shape[a] > 1)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def _fits(shape, pspec, mesh) -> P:
  """Drop mesh axes that do not divide their dimension (e.g. 2 KV heads on 4 devices)."""
  out = []
  for dim, axes in zip(shape, tuple(pspec) + (None,) * (len(shape) - len(pspec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in names:
      size *= mesh.shape[a]
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def state_shardings(state, mesh, rules: Mapping = RULES):
  """NamedShardings for an ``nnx.State`` from its parameters' ``logical_axes``."""

  def one(var):  # works on concrete and abstract (eval_shape) states alike
    shape = var.shape
    axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, _fits(shape, spec(axes, mesh, rules), mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh, rules: Mapping = RULES) -> nnx.Module:
  """Place every parameter of ``model`` on ``mesh`` by the rules (in place; returns it)."""
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, state)
  return model


def _sharding_of(x, axes, *, mesh, rules):
  """NamedSharding of array ``x`` by its logical ``axes`` (None for a missing array)."""
  return None if x is None else NamedSharding(mesh, _fits(x.shape, spec(axes, mesh, rules),
                                                          mesh))


def cache_shardings(cache, mesh, rules: Mapping = RULES):
  """NamedShardings for a ``models.Cache``: batch over data, KV heads over tensor."""

  one = functools.partial(_sharding_of, mesh=mesh, rules=rules)

  kv = ("batch", "seq", "cache_heads", "head_dim")
  return type(cache)(
      k=tuple(one(x, kv) for x in cache.k), v=tuple(one(x, kv) for x in cache.v),
      index_k=tuple(one(x, ("batch", "seq", "index_dim")) for x in cache.index_k),
      lengths=one(cache.lengths, ("batch",)))


def paged_cache_shardings(cache, mesh, rules: Mapping = RULES):
  """NamedShardings for a ``models.cache.PagedModelCache``: KV pages' heads over tensor, the rest
  replicated (pages are shared by all batch rows, so nothing is split over data)."""

  one = functools.partial(_sharding_of, mesh=mesh, rules=rules)

  kv = (None, None, "cache_heads", "head_dim")
  return type(cache)(
      k=tuple(one(x, kv) for x in cache.k), v=tuple(one(x, kv) for x in cache.v),
      index_k=tuple(one(x, (None, None, None)) for x in cache.index_k),
      page_table=one(cache.page_table, (None, None)), lengths=one(cache.lengths, (None,)))


@contextlib.contextmanager
def activation_sharding(mesh, rules: Mapping = RULES):
  """Within the block, ``constrain`` pins activations to ``mesh`` by the rules."""
  previous = dict(_active)
  _active.update(mesh=mesh, rules=rules)
  try:
    yield
  finally:
    _active.clear()
    _active.update(previous)


def active_mesh() -> jax.sharding.Mesh | None:
  """The mesh of the enclosing ``activation_sharding`` block (None outside one)."""
  return _active.get("mesh")


def fitted_spec(shape, logical_axes, mesh, rules: Mapping | None = None) -> P:
  """The PartitionSpec of an array of ``shape`` by logical names (the active rules by
  default), without the mesh axes that do not divide their dimension."""
  return _fits(shape, spec(logical_axes, mesh, rules or _active.get("rules") or RULES), mesh)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op outside ``activation_sharding``."""
  mesh = _active.get("mesh")
  if mesh is None:
    return x
  pspec = _fits(x.shape, spec(logical_axes, mesh, _active["rules"]), mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, pspec))
