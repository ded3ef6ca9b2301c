"""Feed-forward blocks of the MiniMax-M3 family (docs/minimax_m3.md §3.5).

* ``MLP``: ``down(swiglu_oai(gate(h), up(h)))`` (dense layers and the shared expert).
* ``MoE``: fp32 sigmoid router; ``e_score_correction_bias`` shifts the top-k *selection*
  only; the chosen unbiased sigmoids are renormalised and scaled by ``routed_scaling_factor``;
  the shared expert is added unscaled. Routed experts are stacked ``[E, ...]`` weights run
  as grouped matmuls on tokens sorted by expert (no loop over experts):
  ``jax.lax.ragged_dot``, or on GPUs for inference ``models.grouped_matmul``'s kernels,
  which read only the routed experts' weights at decode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import grouped_matmul as gm
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


class MoE(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    c = config
    self.config = c
    e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
    self.gate = nnx.Param(scaled_normal(rngs.params(), (h, e), h), logical_axes=("embed", None))
    self.e_score_correction_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                             logical_axes=(None,))
    out_scale = 1.0 / math.sqrt(2 * c.num_layers)
    self.w1 = nnx.Param(scaled_normal(rngs.params(), (e, h, i), h, 1.0, param_dtype),
                        logical_axes=("experts", "embed", "expert_mlp"))  # gate
    self.w3 = nnx.Param(scaled_normal(rngs.params(), (e, h, i), h, 1.0, param_dtype),
                        logical_axes=("experts", "embed", "expert_mlp"))  # up
    self.w2 = nnx.Param(scaled_normal(rngs.params(), (e, i, h), i, out_scale, param_dtype),
                        logical_axes=("experts", "expert_mlp", "embed"))  # down
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

  def __call__(self, h, *, implementation="xla", interpret=False):
    """``implementation`` runs the expert matmuls (``models.grouped_matmul``): "xla"
    (``lax.ragged_dot``, differentiable) or "pallas_gpu" (inference kernels)."""
    c = self.config
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    n, k = x.shape[0], c.num_experts_per_tok
    ids, weights = self.route(x)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = x[order // k]  # tokens grouped by expert
    group_sizes = jnp.bincount(flat, length=c.num_experts).astype(jnp.int32)
    w = lambda p: p[...].astype(x.dtype)
    layout = None  # the few-row kernels' tiles, shared by the three matmuls
    if n * k <= gm.SMALL_ROWS and gm.resolve(implementation, interpret) == "pallas_gpu":
      layout = gm.tile_layout(group_sizes, n * k, 16)
    gmm = functools.partial(gm.grouped_matmul, group_sizes=group_sizes,
                            implementation=implementation, interpret=interpret, layout=layout)
    gate = gmm(tokens, w(self.w1))
    up = gmm(tokens, w(self.w3))
    act = swiglu_oai(gate, up, alpha=c.swiglu_alpha, limit=c.swiglu_limit)
    out_sorted = gmm(act, w(self.w2))
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(n, k, -1)
    y = jnp.sum(out.astype(jnp.float32) * weights[..., None], axis=1).astype(x.dtype)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)
    return y.reshape(shape)
