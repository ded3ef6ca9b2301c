"""Feed-forward blocks of the MiniMax-M3 family (docs/minimax_m3.md §3.5).

* ``MLP``: ``down(swiglu_oai(gate(h), up(h)))`` (dense layers and the shared expert).
* ``MoE``: fp32 sigmoid router; ``e_score_correction_bias`` shifts the top-k *selection*
  only; the chosen unbiased sigmoids are renormalised and scaled by ``routed_scaling_factor``;
  the shared expert is added unscaled. Routed experts are stacked ``[E, ...]`` weights run
  as grouped matmuls on tokens sorted by expert (no loop over experts):
  ``jax.lax.ragged_dot``, or on GPUs for inference ``models.grouped_matmul``'s kernels,
  which read only the routed experts' weights at decode.

The routed experts' weights are in ``param_dtype``, or (``config.expert_weights ==
"mxfp8"``) 8-bit values with an E8M0 scale per 32 input rows (``models.mxfp8``), dequantised
inside the grouped matmul: the released MXFP8 checkpoint stays 8-bit on the device.

Expert parallelism: on a mesh whose ``expert`` axis has more than one device and divides the
experts (inside ``sharding.activation_sharding``), each device holds ``E / expert`` experts (their MLP width
split over ``tensor``) and runs, in a ``shard_map``, the rows its experts were chosen for; a
``psum`` over ``expert`` x ``tensor`` sums the partial outputs. The tokens are already on
every device of those axes (attention is tensor-parallel over them), so no token moves
before the experts; and with ``k`` experts per token, the one all-reduce of ``[N, H]`` moves
fewer bytes than an all-to-all dispatch and return of ``[N * k, H]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import grouped_matmul as gm
from models import mxfp8
from models import sharding as sharding_lib
from models.layers import Linear, scaled_normal, swiglu_oai


class MLP(nnx.Module):

  def __init__(self, config, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               axis: str = "mlp"):
    c = config
    self.config = c
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.gate_proj = Linear(c.hidden_size, width, axes=("embed", axis), **kw)
    self.up_proj = Linear(c.hidden_size, width, axes=("embed", axis), **kw)
    self.down_proj = Linear(width, c.hidden_size, axes=(axis, "embed"),
                            init_scale=1.0 / math.sqrt(2 * c.num_layers), **kw)

  def __call__(self, h, *, implementation="xla", interpret=False):
    """``implementation`` runs the expert matmuls (``models.grouped_matmul``): "xla"
    (``lax.ragged_dot``, differentiable) or "pallas_gpu" (inference kernels)."""
    c = self.config
    act = swiglu_oai(self.gate_proj(h), self.up_proj(h), alpha=c.swiglu_alpha,
                     limit=c.swiglu_limit)
    return self.down_proj(act)


EXPERT_WEIGHTS = ("w1", "w3", "w2")  # gate, up, down


class MoE(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    c = config
    self.config = c
    e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
    self.gate = nnx.Param(scaled_normal(rngs.params(), (h, e), h), logical_axes=("embed", None))
    self.e_score_correction_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                             logical_axes=(None,))
    out_scale = 1.0 / math.sqrt(2 * c.num_layers)
    shapes = {"w1": ((e, h, i), h, 1.0, ("experts", "embed", "expert_mlp")),
              "w3": ((e, h, i), h, 1.0, ("experts", "embed", "expert_mlp")),
              "w2": ((e, i, h), i, out_scale, ("experts", "expert_mlp", "embed"))}
    for name in EXPERT_WEIGHTS:
      shape, fan_in, scale, axes = shapes[name]
      if c.expert_weights == "mxfp8":
        values, scales = mxfp8.quantize(scaled_normal(rngs.params(), shape, fan_in, scale))
        setattr(self, name, nnx.Param(values, logical_axes=axes))
        setattr(self, name + "_scale", nnx.Param(scales, logical_axes=axes))
      else:
        setattr(self, name, nnx.Param(scaled_normal(rngs.params(), shape, fan_in, scale,
                                                    param_dtype), logical_axes=axes))
    self.shared_experts = (MLP(c, c.shared_intermediate_size * c.n_shared_experts, rngs=rngs,
                               param_dtype=param_dtype) if c.n_shared_experts else None)

  def route(self, x):
    """x [N, H] -> (expert ids [N, k] int32, weights [N, k] f32)."""
    c = self.config
    logits = jnp.dot(x.astype(jnp.float32), self.gate[...].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.sigmoid(logits)
    biased = probs + self.e_score_correction_bias[...] if c.use_routing_bias else probs
    _, ids = jax.lax.top_k(biased, c.num_experts_per_tok)
    chosen = jnp.take_along_axis(probs, ids, axis=-1)
    weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * c.routed_scaling_factor
    return ids.astype(jnp.int32), weights

  def _weights(self) -> dict:
    """The routed experts' weights as stored: {"w1": ..., "w3": ..., "w2": ...}, and with
    MXFP8 their scales ("w1_scale", ...)."""
    names = EXPERT_WEIGHTS
    if self.config.expert_weights == "mxfp8":
      names += tuple(name + "_scale" for name in EXPERT_WEIGHTS)
    return {name: getattr(self, name)[...] for name in names}

  def __call__(self, h, *, implementation="xla", interpret=False):
    """``implementation`` runs the expert matmuls (``models.grouped_matmul``): "xla"
    (``lax.ragged_dot``, differentiable) or "pallas_gpu" (inference kernels)."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    ids, weights = self.route(x)
    run = functools.partial(routed_experts, config=self.config,
                            implementation=implementation, interpret=interpret)
    mesh = sharding_lib.active_mesh()
    experts = mesh.shape.get("expert", 1) if mesh is not None else 1
    if experts > 1 and self.config.num_experts % experts == 0:
      y = _expert_parallel(run, mesh, x, ids, weights, self._weights())
    else:
      y = run(x, ids, weights, self._weights())
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)
    return y.reshape(shape)


def routed_experts(x, ids, weights, experts, *, config, first_expert=0, implementation="xla",
                   interpret=False):
  """The routed experts' output ``[N, H]`` for tokens ``x [N, H]`` routed to ``ids [N, k]``
  with ``weights [N, k]``, by the experts ``experts`` holds (``MoE._weights()``: ``E_local``
  experts from ``first_expert`` on): the choices of other experts add nothing."""
  c = config
  n, k = ids.shape
  e_local = experts["w1"].shape[0]
  partial = e_local < c.num_experts  # static: some experts live on other devices
  local = ids - first_expert
  mine = (local >= 0) & (local < e_local) if partial else None
  # Choices of other devices' experts sort last, past every group.
  flat = (jnp.where(mine, local, e_local) if partial else ids).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  tokens = x[order // k]  # tokens grouped by expert
  group_sizes = jnp.bincount(flat, length=e_local + 1)[:e_local].astype(jnp.int32)
  layout = None  # the few-row kernels' tiles, shared by the three matmuls
  if n * k <= gm.SMALL_ROWS and gm.resolve(implementation, interpret) == "pallas_gpu":
    layout = gm.tile_layout(group_sizes, n * k, 16)

  def gmm(rows, name):
    w, scales = experts[name], experts.get(name + "_scale")
    return gm.grouped_matmul(rows, w if scales is not None else w.astype(x.dtype), group_sizes,
                             scales=scales, implementation=implementation, interpret=interpret,
                             layout=layout)

  act = swiglu_oai(gmm(tokens, "w1"), gmm(tokens, "w3"), alpha=c.swiglu_alpha,
                   limit=c.swiglu_limit)
  out_sorted = gmm(act, "w2")
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(n, k, -1)
  out = out.astype(jnp.float32)
  if partial:  # rows of other devices' experts were never computed: 0, never garbage * 0
    out = jnp.where(mine[..., None], out, 0.0)
  return jnp.sum(out * weights[..., None], axis=1).astype(x.dtype)


def _expert_parallel(run, mesh, x, ids, weights, experts):
  """``run`` (``routed_experts``) per device of ``mesh``'s expert x tensor axes, on the
  device's experts, summed over those axes."""
  P = jax.sharding.PartitionSpec
  rows = sharding_lib.fitted_spec(x.shape, ("batch", None), mesh)
  i = experts["w1"].shape[2]
  # The width splits over tensor where each device's part is whole (whole scale blocks).
  t = mesh.shape.get("tensor", 1)
  block = mxfp8.BLOCK if "w1_scale" in experts else 1
  tensor = "tensor" if t > 1 and i % (t * block) == 0 else None
  specs = {"w1": P("expert", None, tensor), "w3": P("expert", None, tensor),
           "w2": P("expert", tensor, None)}
  expert_specs = {name: specs[name.removesuffix("_scale")] for name in experts}
  reduce_axes = ("expert",) + ((tensor,) if tensor else ())

  def local(x, ids, weights, experts):
    first = jax.lax.axis_index("expert") * experts["w1"].shape[0]
    return jax.lax.psum(run(x, ids, weights, experts, first_expert=first), reduce_axes)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(rows, rows, rows, expert_specs), out_specs=rows,
                       check_vma=False)(x, ids, weights, experts)
