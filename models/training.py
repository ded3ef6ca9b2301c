"""Fine-tuning machinery: parameter partition, Optax optimizer, sharded train step, checkpoints.

Parameters live in a flat dict ``{"layers.1.self_attn.q_proj.kernel": array, ...}`` (keys from
the NNX paths) so that trainable/frozen subsets, optimizer state and Orbax checkpoints are plain
pytrees. The train state is ``{"step", "params", "opt_state"}`` plus ``"master"`` (float32
copies of the trainable parameters) when some trainable parameter is stored in lower
precision: gradients and AdamW moments are then float32 and the bf16 parameters are re-cast
from the master copy after every update.

Training schedule (docs/msa.md §5, the MSA paper, arXiv 2606.13392):

* ``mode="full"``: every parameter trains (except the MoE routing bias, which load balancing
  moves, not gradients, and the index branch when ``kl_weight`` is 0: with no gradient, AdamW
  would only decay it); loss ``L_LM + kl_weight * sum_layers L_KL``. The index branch's input
  is detached and top-k is not differentiable, so L_LM never reaches the index projections and
  L_KL reaches nothing else (paper Eq. 11).
* ``mode="indexer-only"``: backbone frozen, only the index projections and norms train, on
  ``kl_weight * sum_layers L_KL``.
* Steps ``< dense_warmup_steps``: attention dense; the KL support is the whole causal context
  (paper §7.3 stage 1, App. B.4) or, with ``dense_kl_support="selected"``, the index
  branch's own top-k blocks. Later steps: ``attention`` ("msa": KL over the selected blocks,
  paper §7.3 stage 2; "dense": as in warm-up).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import losses
from models import sharding as sharding_lib
from models.transformer import MiniMaxM3, create_model

INDEX_PARAM_NAMES = ("index_q_proj", "index_k_proj", "index_q_norm", "index_k_norm")
NEVER_TRAINED = ("e_score_correction_bias",)  # moved by load balancing, not by gradients
MODES = ("full", "indexer-only")


# ----------------------------------------------------------------------------- parameters


def param_key(path) -> str:
  return ".".join(str(p) for p in path)


def is_index_param(key: str) -> bool:
  return any(f".{name}." in f".{key}." for name in INDEX_PARAM_NAMES)


def trainable_keys(keys, mode: str) -> list[str]:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  keep = [k for k in keys if not any(n in k for n in NEVER_TRAINED)]
  return [k for k in keep if is_index_param(k)] if mode == "indexer-only" else keep


class ModelParts:
  """A model split into its graph, a flat parameter dict and the per-key metadata needed to
  rebuild it (``merge``) and to shard it."""

  def __init__(self, model: MiniMaxM3):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    self.graphdef, self.rest = graphdef, rest
    self.template = dict(nnx.to_flat_state(params))  # path -> Variable (metadata)
    self.paths = {param_key(p): p for p in self.template}
    self.config = model.config

  def params(self, model: MiniMaxM3 | None = None) -> dict:
    source = self.template if model is None else dict(
        nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {param_key(p): v[...] for p, v in source.items()}

  def release(self):
    """Drop the template's parameter values (keep shapes, dtypes, metadata): ``params()``
    then returns ShapeDtypeStructs; ``merge`` and ``shardings`` work as before."""
    self.template = {p: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype))
                     for p, v in self.template.items()}

  def merge(self, params: Mapping[str, jax.Array]) -> MiniMaxM3:
    flat = [(p, self.template[p].replace(params[k])) for k, p in self.paths.items()]
    return nnx.merge(self.graphdef, nnx.from_flat_state(flat), self.rest)

  def shardings(self, mesh, rules=sharding_lib.RULES) -> dict:
    state = nnx.from_flat_state(list(self.template.items()))
    flat = dict(nnx.to_flat_state(sharding_lib.state_shardings(state, mesh, rules)))
    return {param_key(p): (s.sharding if isinstance(s, nnx.Variable) else s)
            for p, s in flat.items()}

  def dtypes(self) -> dict:
    return {param_key(p): v.dtype for p, v in self.template.items()}


# ----------------------------------------------------------------------------- configuration


# KL while attention is dense (the warm-up): the whole causal context (the paper's), the
# index branch's top-k blocks, or the causal context pooled to blocks (an extension; the
# indexer_loss "causal_block" of models.attention).
DENSE_KL_SUPPORTS = ("causal", "selected", "causal_block")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  total_steps: int
  mode: str = "full"
  attention: str = "msa"
  dense_warmup_steps: int = 0
  dense_kl_support: str = "causal"
  kl_weight: float = 1.0
  learning_rate: float = 3e-4
  lr_warmup_steps: int = 0
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  remat: bool = False
  dense_implementation: str | None = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
    if self.attention not in ("msa", "dense"):
      raise ValueError(f"attention must be 'msa' or 'dense'; got {self.attention!r}")
    if self.dense_kl_support not in DENSE_KL_SUPPORTS:
      raise ValueError(f"dense_kl_support must be one of {DENSE_KL_SUPPORTS}; got "
                       f"{self.dense_kl_support!r}")
    if self.mode == "indexer-only" and self.kl_weight <= 0:
      raise ValueError("indexer-only mode trains on the KL loss alone: kl_weight must be > 0")

  def phase(self, step: int) -> tuple[str, str | None]:
    """(attention, indexer_loss) of the step with 0-based index ``step``."""
    attention = "dense" if step < self.dense_warmup_steps else self.attention
    if self.kl_weight <= 0:
      return attention, None
    return attention, (self.dense_kl_support if attention == "dense" else "selected")

  def schedule(self) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to min_lr_ratio * peak."""
    decay = max(self.total_steps, self.lr_warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.lr_warmup_steps,
                                              decay, self.learning_rate * self.min_lr_ratio)

  def optimizer(self) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only, not norms/vectors)."""
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
    adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                        weight_decay=self.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw) \
        if self.clip_norm > 0 else adamw


# ----------------------------------------------------------------------------- the trainer


class Trainer:
  """Builds the train state and a jitted, sharded train step for one model and config.

  ``mesh`` (default: one device) shards parameters, master weights and optimizer state by the
  logical-axis rules (``embed`` over ``fsdp``, ...) and the batch over ``data`` x ``fsdp``.
  """

  def __init__(self, model: MiniMaxM3, config: TrainConfig, mesh=None,
               rules=sharding_lib.RULES):
    self.parts = ModelParts(model)
    self.config = config
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh(
        {"data": 1}, devices=jax.devices()[:1])
    self.rules = rules
    c = model.config
    keys = list(self.parts.paths)
    self.trainable = trainable_keys(keys, config.mode)
    if config.kl_weight <= 0:  # nothing trains the index branch: keep it out of AdamW (decay)
      self.trainable = [k for k in self.trainable if not is_index_param(k)]
    if not self.trainable:
      raise ValueError(f"mode {config.mode!r} has nothing to train (no MSA layers?)")
    self.has_sparse = any(c.sparse_layers)
    if config.mode == "indexer-only" and not self.has_sparse:
      raise ValueError("indexer-only mode needs MSA layers (sparse_layers)")
    self.dtypes = self.parts.dtypes()
    self.use_master = any(self.dtypes[k] != jnp.float32 for k in self.trainable)
    self.tx = config.optimizer()
    self.lr = config.schedule()
    self.param_shardings = self.parts.shardings(self.mesh, rules)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, sharding_lib.spec(("batch", "seq"),
                                                                     self.mesh, rules))
    self._steps = {}
    self.state_shardings = self._state_shardings()

  # -- state

  def _train_subset(self, params):
    return {k: params[k] for k in self.trainable}

  def _state_shardings(self):
    train_sh = self._train_subset(self.param_shardings)
    abstract_train = {k: jax.ShapeDtypeStruct(self.parts.template[self.parts.paths[k]].shape,
                                              jnp.float32 if self.use_master else self.dtypes[k])
                      for k in self.trainable}
    opt_abstract = jax.eval_shape(self.tx.init, abstract_train)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, train_sh,
                                   transform_non_params=lambda _: self.replicated)
    out = {"step": self.replicated, "params": dict(self.param_shardings), "opt_state": opt_sh}
    if self.use_master:
      out["master"] = train_sh
    return out

  def _build(self, params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params}
    train = self._train_subset(params)
    if self.use_master:
      train = {k: v.astype(jnp.float32) for k, v in train.items()}
      state["master"] = train
    state["opt_state"] = self.tx.init(train)
    return state

  def init_state(self, params: Mapping[str, jax.Array] | None = None) -> dict:
    """A fresh state (step 0) from ``params`` (default: the model's), placed on the mesh."""
    params = self.parts.params() if params is None else dict(params)
    params = {k: jnp.asarray(v, self.dtypes[k]) for k, v in params.items()}
    params = jax.device_put(params, self.param_shardings)
    return jax.jit(self._build, out_shardings=self.state_shardings)(params)

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    params = {k: jax.ShapeDtypeStruct(self.parts.template[p].shape, self.dtypes[k])
              for k, p in self.parts.paths.items()}
    shapes = jax.eval_shape(self._build, params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def model(self, state) -> MiniMaxM3:
    return self.parts.merge(state["params"])

  # -- the step

  def loss_fn(self, train, frozen, batch, attention, indexer_loss):
    """(loss, metrics) of one batch; ``train`` holds the trainable parameters (float32 master
    copies when mixed precision), ``frozen`` the rest."""
    params = dict(frozen)
    params.update({k: v.astype(self.dtypes[k]) for k, v in train.items()})
    model = self.parts.merge(params)
    logits, aux = model.train_forward(batch["inputs"], attention=attention,
                                      indexer_loss=indexer_loss, remat=self.config.remat,
                                      dense_implementation=self.config.dense_implementation)
    lm_sum, count = losses.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    lm = lm_sum / jnp.maximum(count, 1.0)
    kl = jnp.sum(aux["kl"])
    loss = self.config.kl_weight * kl
    if self.config.mode == "full":
      loss = loss + lm
    return loss, {"loss": loss, "lm_loss": lm, "kl": kl, "kl_per_layer": aux["kl"]}

  def _step_fn(self, attention, indexer_loss):

    def step(state, batch):
      params = state["params"]
      train = state["master"] if self.use_master else self._train_subset(params)
      frozen = {k: v for k, v in params.items() if k not in train}
      grads, metrics = jax.grad(self.loss_fn, has_aux=True)(train, frozen, batch, attention,
                                                            indexer_loss)
      metrics["grad_norm"] = optax.global_norm(grads)
      index_grads = [g for k, g in grads.items() if is_index_param(k)]
      metrics["grad_norm_index"] = (optax.global_norm(index_grads) if index_grads
                                    else jnp.zeros((), jnp.float32))
      metrics["lr"] = jnp.asarray(self.lr(state["step"]), jnp.float32)
      updates, opt_state = self.tx.update(grads, state["opt_state"], train)
      train = optax.apply_updates(train, updates)
      new_params = dict(params)
      new_params.update({k: v.astype(self.dtypes[k]) for k, v in train.items()})
      new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
      if self.use_master:
        new["master"] = train
      return new, metrics

    return step

  def step(self, state, batch, step: int | None = None):
    """One optimizer step: (new state, metrics). ``batch``: dict of host arrays [B, T] with B
    divisible by the data x fsdp devices. The phase (dense warm-up or not) follows the state's
    step (pass it as ``step`` to skip reading it back from the device); each phase compiles
    once."""
    step = int(state["step"]) if step is None else step
    phase = self.config.phase(step)
    if phase not in self._steps:
      self._steps[phase] = jax.jit(self._step_fn(*phase),
                                   in_shardings=(self.state_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, self.replicated),
                                   donate_argnums=(0,))
    batch = self.put_batch(batch)
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self._steps[phase](state, batch)

  def put_batch(self, batch):
    shards = math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)
    b = batch["inputs"].shape[0]
    if b % shards:
      raise ValueError(f"batch size {b} must be divisible by data x fsdp = {shards} devices")
    return {k: jax.device_put(np.asarray(v), self.batch_sharding)
            for k, v in batch.items() if k in ("inputs", "targets", "loss_mask")}


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """Orbax CheckpointManager over ``folder``: the train state plus a JSON ``meta`` item (step,
  examples consumed, data and train settings) every save; keeps the last ``keep``."""

  def __init__(self, folder: str, *, keep: int | None = 3):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.folder = os.path.abspath(folder)
    self.manager = ocp.CheckpointManager(
        self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict):
    args = self.ocp.args
    self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                meta=args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """The state onto ``abstract_state``'s shardings (any mesh: Orbax reshards) and meta."""
    args = self.ocp.args
    out = self.manager.restore(step, args=args.Composite(
        state=args.StandardRestore(abstract_state), meta=args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_newest_intact(self, abstract_state):
    """Restore the newest step that restores; a damaged newer one (e.g. a checkpoint torn by
    a kill) is renamed ``<step>.broken`` so it is neither used nor overwritten.

    Returns (step, state, meta, [(broken step, renamed folder, error), ...]); raises
    ``RuntimeError`` naming the folders when no step restores.
    """
    broken = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # TensorStore / metadata errors of a damaged step
        path = os.path.join(self.folder, str(step))
        aside = path + ".broken"
        if os.path.exists(aside):
          aside += f"-{int(time.time())}"
        broken.append((step, aside, f"{type(e).__name__}: {str(e)[:300]}"))
        continue
      if broken:
        for _, aside, _ in broken:
          os.rename(aside[:aside.rindex(".broken")], aside)
        self.manager.reload()
      return step, state, meta, broken
    raise RuntimeError(f"{self.folder}: no checkpoint step restores ("
                       + "; ".join(f"step {s}: {err}" for s, _, err in broken) + ")")

  def restore_params(self, step: int | None = None) -> dict:
    """Only the ``params`` of a checkpoint, onto the first local device whatever mesh saved
    them (for --init-from and evaluation)."""
    ocp = self.ocp
    step = self.latest_step() if step is None else step
    saved = self.manager.item_metadata(step)["state"]["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)}
    restore_args = {"params": jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device),
                                           saved)}
    # A second manager that reads "state" as a plain PyTree, so a subset can be restored.
    reader = ocp.CheckpointManager(self.folder, item_handlers={
        "state": ocp.PyTreeCheckpointHandler()}, options=ocp.CheckpointManagerOptions(
            read_only=True))
    try:
      out = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          target, restore_args=restore_args, partial_restore=True)))
    finally:
      reader.close()
    return dict(out["state"]["params"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_json(path: str, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=1)


# ----------------------------------------------------------------------------- model building


def parse_layer_pattern(text: str, num_layers: int) -> tuple[bool, ...]:
  """"all", "none", "from=N" (layers >= N) or one 0/1 per layer ("0,1,1")."""
  text = text.strip()
  if text == "all":
    return (True,) * num_layers
  if text == "none":
    return (False,) * num_layers
  if text.startswith("from="):
    start = int(text[5:])
    return tuple(i >= start for i in range(num_layers))
  flags = [p.strip() for p in text.split(",")]
  if len(flags) != num_layers or any(f not in ("0", "1") for f in flags):
    raise ValueError(f"layer pattern {text!r}: expected all, none, from=N or {num_layers} "
                     "comma-separated 0/1 flags")
  return tuple(f == "1" for f in flags)


def override_config(config, **overrides):
  """``config`` with the given fields replaced (None = keep). ``sparse_layers`` and
  ``moe_layers`` take a pattern string (``parse_layer_pattern``); when ``num_layers`` changes
  without a pattern, the old pattern is cut or extended by repeating its last entry."""
  changes = {k: v for k, v in overrides.items() if v is not None}
  n = changes.get("num_layers", config.num_layers)
  for name in ("sparse_layers", "moe_layers"):
    if name in changes:
      changes[name] = parse_layer_pattern(changes[name], n)
    elif n != config.num_layers:
      old = getattr(config, name)
      changes[name] = tuple(old[:n]) + (old[-1],) * max(0, n - len(old))
  if any(changes.get("sparse_layers", config.sparse_layers)):
    # An index head per KV group; a dense config converted to MSA gets the spec's defaults.
    changes.setdefault("index_num_heads", changes.get("num_kv_heads", config.num_kv_heads))
    if not config.index_head_dim and "index_head_dim" not in changes:
      changes["index_head_dim"] = changes.get("head_dim", config.head_dim)
  return config.replace(**changes)


def build_model(config, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                implementation=None, interpret=False, init_params: Mapping | None = None):
  """A model of ``config`` (random init from ``seed``), optionally starting from
  ``init_params`` (flat dict): every parameter found there is copied (cast to its dtype),
  parameters missing there (e.g. index projections added to a dense model) keep their fresh
  init. Returns (model, {"added": [...], "dropped": [...]}); a shape mismatch raises."""
  model = create_model(config, seed=seed, dtype=dtype, param_dtype=param_dtype,
                       implementation=implementation, interpret=interpret)
  report = {"added": [], "dropped": []}
  if init_params is None:
    return model, report
  parts = ModelParts(model)
  params = parts.params()
  for key, value in params.items():
    if key not in init_params:
      report["added"].append(key)
      continue
    src = init_params[key]
    if tuple(src.shape) != tuple(value.shape):
      raise ValueError(f"parameter {key}: checkpoint shape {tuple(src.shape)} does not match "
                       f"the model's {tuple(value.shape)}")
    params[key] = jnp.asarray(src).astype(value.dtype)
  report["dropped"] = sorted(k for k in init_params if k not in params)
  return parts.merge(params), report


def is_run_folder(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_params(path: str):
  """(config, flat params) from a fine-tuning run folder (its latest checkpoint), an Orbax
  model folder (``checkpoint.save_orbax``, e.g. a run's ``model/``) or a HF folder."""
  from models import checkpoint
  from models import config as config_lib
  path = os.path.abspath(path)
  if is_run_folder(path):
    ckpts = Checkpoints(os.path.join(path, "checkpoints"), keep=None)
    step = ckpts.latest_step()
    if step is None:
      ckpts.close()
      model_dir = os.path.join(path, "model")
      if os.path.isdir(model_dir):
        return load_params(model_dir)
      raise ValueError(f"{path}: the run has no checkpoint yet")
    params = ckpts.restore_params(step)
    ckpts.close()
    return config_lib.from_hf_config(path), {k: np.asarray(v) for k, v in params.items()}
  if os.path.isdir(os.path.join(path, "model")):  # a run folder copied without checkpoints/
    return load_params(os.path.join(path, "model"))
  model = checkpoint.load(path, progress=False)
  return model.config, ModelParts(model).params(model)


def randomize_index_params(params: Mapping, config, seed: int) -> dict:
  """``params`` with the index projections and norms re-drawn from a fresh init (the
  random-indexer baseline: MSA selecting blocks by an untrained index branch)."""
  fresh = ModelParts(create_model(config, seed=seed)).params()
  out = dict(params)
  for key in out:
    if is_index_param(key):
      out[key] = jnp.asarray(fresh[key]).astype(out[key].dtype)
  return out
