"""Hugging Face MiniMax-M3 checkpoints <-> model parameters (docs/minimax_m3.md §2, §4).

Reading streams one tensor at a time through ``safetensors.safe_open`` (lazy), so host memory
stays bounded by the largest parameter (a stacked ``[E, ...]`` expert weight), and places each
parameter straight into its sharding on the mesh. Names: the ``language_model.`` prefix is
stripped; Linear weights are ``[out, in]`` and transposed to ``[in, out]``; ``experts.{e}.w1 /
w3 / w2`` (gate / up / down) are stacked into ``[E, ...]``; the router weight and bias stay
float32; MXFP8 weights (``float8_e4m3fn`` plus a ``uint8`` E8M0 ``weight_scale_inv`` per 32
input columns) are dequantised as ``w * 2^(scale - 127)``. Vision, projector and MTP tensors
are skipped with one log line. Every problem raises ``CheckpointError`` naming the file and
the tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models import config as config_lib
from models import mxfp8
from models import sharding as sharding_lib
from models.transformer import MiniMaxM3, create_model

log = logging.getLogger(__name__)

from safetensors import safe_open
from safetensors.numpy import save_file

PREFIX = "language_model."
SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.",
                    "model.mtp.", "mtp.")
MXFP8_BLOCK = mxfp8.BLOCK
SUPPORTED_DTYPES = {"BF16", "F16", "F32", "F8_E4M3"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded: names the file and the tensor."""


# ----------------------------------------------------------------------------- name mapping


def param_sources(config) -> dict[tuple, list[tuple[str, str]]]:
  """For each model parameter path, its HF tensors as ``(name, how)``.

  ``how``: "copy" (same layout), "linear" (transpose [out, in] -> [in, out]), or
  "experts" (one tensor per expert, each transposed, stacked on a new axis 0).
  """
  out: dict[tuple, list[tuple[str, str]]] = {
      ("embed_tokens",): [("model.embed_tokens.weight", "copy")],
      ("norm", "weight"): [("model.norm.weight", "copy")],
      ("lm_head", "kernel"): [("lm_head.weight", "linear")],
  }
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    layer = ("layers", i)
    out[layer + ("input_layernorm", "weight")] = [(p + "input_layernorm.weight", "copy")]
    out[layer + ("post_attention_layernorm", "weight")] = [
        (p + "post_attention_layernorm.weight", "copy")]
    attn = layer + ("self_attn",)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    norms = ["q_norm", "k_norm"]
    if config.sparse_layers[i]:
      projections += ["index_q_proj", "index_k_proj"]
      norms += ["index_q_norm", "index_k_norm"]
    for name in projections:
      out[attn + (name, "kernel")] = [(f"{p}self_attn.{name}.weight", "linear")]
    for name in norms:
      out[attn + (name, "weight")] = [(f"{p}self_attn.{name}.weight", "copy")]
    if config.moe_layers[i]:
      moe, m = layer + ("block_sparse_moe",), p + "block_sparse_moe."
      out[moe + ("gate",)] = [(m + "gate.weight", "linear")]
      out[moe + ("e_score_correction_bias",)] = [(m + "e_score_correction_bias", "copy")]
      for w in ("w1", "w2", "w3"):
        out[moe + (w,)] = [(f"{m}experts.{e}.{w}.weight", "experts")
                           for e in range(config.num_experts)]
      if config.n_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
          out[moe + ("shared_experts", name, "kernel")] = [
              (f"{m}shared_experts.{name}.weight", "linear")]
    else:
      for name in ("gate_proj", "up_proj", "down_proj"):
        out[layer + ("mlp", name, "kernel")] = [(f"{p}mlp.{name}.weight", "linear")]
  return out


# ----------------------------------------------------------------------------- files


def read_json(path: str, what: str = "JSON file") -> dict:
  """A JSON file's contents; ``CheckpointError`` naming the file when it is missing or
  malformed."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: {what} not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: malformed {what}: {e}") from None


def refuse_nonempty(folder: str):
  if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
    raise CheckpointError(f"{folder}: destination exists and is not empty; choose a new "
                          "folder or remove it first (nothing was written)")


class _AtomicFolder:
  """Write into a temporary sibling folder; rename it to ``folder`` only when the body ends
  without error (the temporary folder is removed otherwise), so a failure never leaves a
  partial checkpoint under the final name."""

  def __init__(self, folder: str):
    self.folder = os.path.abspath(folder)
    refuse_nonempty(self.folder)
    parent = os.path.dirname(self.folder)
    os.makedirs(parent, exist_ok=True)
    import tempfile
    self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.folder)}.partial-",
                                dir=parent)

  def __enter__(self) -> str:
    return self.tmp

  def __exit__(self, kind, value, tb):
    import shutil
    if kind is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    try:
      if os.path.isdir(self.folder) and not os.listdir(self.folder):
        os.rmdir(self.folder)  # an empty destination is fine: replaced
      os.replace(self.tmp, self.folder)
    except OSError:  # e.g. another process wrote the destination meanwhile
      shutil.rmtree(self.tmp, ignore_errors=True)
      raise
    return False


def require_finite(name: str, value, where: str):
  """``CheckpointError`` when ``value`` (NumPy or JAX) holds NaN or Inf."""
  finite = bool(np.isfinite(value).all()) if isinstance(value, np.ndarray) else bool(
      jnp.isfinite(value).all())
  if not finite:
    raise CheckpointError(f"{where}: parameter {name} holds NaN or Inf values (pass "
                          "check_finite=False to load it anyway)")


# ----------------------------------------------------------------------------- reading


def _header(path: str) -> tuple[dict, int]:
  """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its
  data starts. The format: an 8-byte little-endian header length, the JSON header, the data."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(header_len)), 8 + header_len


class _Tensors:
  """Lazy access to the tensors of a HF folder (sharded with an index, or one file)."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
      weight_map = read_json(index, "safetensors index").get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed safetensors index: no 'weight_map' object")
    elif os.path.exists(single):
      weight_map = {name: "model.safetensors" for name in self._keys(single)}
    else:
      raise CheckpointError(f"{folder}: neither model.safetensors.index.json nor "
                            "model.safetensors found")
    self.files = {}  # stripped name -> file
    for name, file in weight_map.items():
      self.files[name[len(PREFIX):] if name.startswith(PREFIX) else name] = file
    self.raw_names = {(n[len(PREFIX):] if n.startswith(PREFIX) else n): n for n in weight_map}
    self._open: dict[str, object] = {}
    self._headers: dict[str, tuple[dict, int]] = {}

  @staticmethod
  def _keys(path):
    try:
      with safe_open(path, framework="numpy") as f:
        return list(f.keys())
    except Exception as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

  def _handle(self, file: str):
    if file not in self._open:
      path = os.path.join(self.folder, file)
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: shard listed in the index is missing")
      try:
        self._open[file] = safe_open(path, framework="numpy")
      except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from None
    return self._open[file]

  def __contains__(self, name):
    return name in self.files

  def where(self, name):
    return os.path.join(self.folder, self.files[name])

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32 (MXFP8 dequantised) or its stored dtype for non-floats."""
    if name not in self.files:
      raise CheckpointError(f"{self.folder}: tensor {self.raw_names.get(name, name)!r} is "
                            "missing from the checkpoint")
    handle = self._handle(self.files[name])
    raw = self.raw_names[name]
    try:
      dtype = handle.get_slice(raw).get_dtype()
      if dtype not in SUPPORTED_DTYPES and not (dtype == "U8" and name.endswith("_scale_inv")):
        raise CheckpointError(f"{self.where(name)}: tensor {raw!r} has unsupported dtype "
                              f"{dtype} (expected one of {sorted(SUPPORTED_DTYPES)})")
      x = self._fp8(name) if dtype == "F8_E4M3" else handle.get_tensor(raw)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{self.where(name)}: cannot read tensor {raw!r} (truncated or "
                            f"corrupt?): {e}") from None
    if dtype == "F8_E4M3":
      scale_name = name + "_scale_inv"
      if scale_name not in self.files:
        raise CheckpointError(f"{self.where(name)}: fp8 tensor {raw!r} has no "
                              f"{raw + '_scale_inv'!r} (only MXFP8 quantisation is supported)")
      scale = self.get(scale_name)
      return dequantize_mxfp8(x, scale, name=f"{self.where(name)}: {raw}")
    return x.astype(np.float32) if x.dtype != np.uint8 else x

  def _fp8(self, name: str) -> np.ndarray:
    """An F8_E4M3 tensor, mapped from disk. safetensors' NumPy reader looks the type up as
    ``numpy.float8_e4m3fn``, which NumPy lacks (ml_dtypes has it), so the bytes are read at
    the offsets the file's header gives (each file's header read once)."""
    path, raw = self.where(name), self.raw_names[name]
    if path not in self._headers:
      self._headers[path] = _header(path)
    header, data_start = self._headers[path]
    start, end = header[raw]["data_offsets"]
    shape = tuple(header[raw]["shape"])
    if end - start != math.prod(shape):
      raise CheckpointError(f"{path}: tensor {raw!r}: {end - start} bytes for shape {shape}")
    return np.memmap(path, dtype=ml_dtypes.float8_e4m3fn, mode="r", offset=data_start + start,
                     shape=shape)

  def get_mxfp8(self, name: str, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The tensor ``[out, in]`` as MXFP8 (values, scales ``[out, ceil(in/32)]``): as stored
    when the checkpoint holds it so (checked against its scales and, with ``check_finite``,
    for NaN/Inf), else rounded to it."""
    stored = (name + "_scale_inv" in self.files and self._handle(self.files[name]).get_slice(
        self.raw_names[name]).get_dtype() == "F8_E4M3")
    if not stored:
      value = self.get(name)
      if check_finite:
        require_finite(self.raw_names[name], value, self.where(name))
      values, scales = mxfp8.quantize(value.T)
      return values.T, scales.T
    values, scales = self._fp8(name), self.get(name + "_scale_inv")
    where = f"{self.where(name)}: {self.raw_names[name]}"
    weight = dequantize_mxfp8(values, scales, name=where)  # checks the scales' shape
    if check_finite:
      require_finite(self.raw_names[name], weight, self.where(name))
    return values, scales

  def close(self):
    self._open.clear()


def dequantize_mxfp8(weight: np.ndarray, scale: np.ndarray, name: str = "tensor"):
  """``w[o, i] = fp8[o, i] * 2^(scale[o, i // 32] - 127)`` as float32 (the checkpoint's
  ``[out, in]`` layout)."""
  try:
    return mxfp8.dequantize(weight.T, scale.T, np.float32).T
  except ValueError as e:
    raise CheckpointError(f"{name}: {e} (stored transposed: [out, in])") from None


def _assemble(tensors: _Tensors, sources, expected_shape, path) -> np.ndarray:
  if sources[0][1] == "experts":
    parts = [tensors.get(name).T for name, _ in sources]
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
      raise CheckpointError(f"{tensors.where(sources[0][0])}: experts of {path} differ in "
                            f"shape: {sorted(shapes)}")
    value = np.stack(parts)
  else:
    (name, how), = sources
    value = tensors.get(name)
    value = value.T if how == "linear" else value
  if value.shape != tuple(expected_shape):
    name = sources[0][0]
    hf_shape = value.shape[::-1] if sources[0][1] == "linear" else value.shape
    raise CheckpointError(f"{tensors.where(name)}: tensor {tensors.raw_names[name]!r} has "
                          f"shape {list(hf_shape)}, the config implies "
                          f"{list(expected_shape[::-1] if sources[0][1] == 'linear' else expected_shape)}")
  return value


def _assemble_mxfp8(tensors: _Tensors, sources, expected_shape, path, check_finite):
  """The stacked experts of ``sources`` as MXFP8 (values [E, in, out], scales [E, in/32, out])."""
  parts = [tensors.get_mxfp8(name, check_finite) for name, _ in sources]
  values = np.stack([v.T for v, _ in parts])
  if values.shape != tuple(expected_shape):
    raise CheckpointError(f"{tensors.where(sources[0][0])}: experts of {path} have shape "
                          f"{list(values.shape)}, the config implies {list(expected_shape)}")
  return values, np.stack([s.T for _, s in parts])


def _place(host: np.ndarray, sharding):
  """A host array on the devices: in ``sharding`` (each device reads its slice), or on the
  default device."""
  if sharding is None:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _progress(items, total, desc):
  try:
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit="param", leave=False)
  except ImportError:  # tqdm is optional for library use
    return items


def _config(folder: str):
  """The folder's config.json as a ``ModelConfig``; errors name the file."""
  path = os.path.join(folder, "config.json")
  try:
    return config_lib.from_hf_config(read_json(path, "config.json"))
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def _abstract_model(config, *, mesh, rules, dtype, param_dtype, implementation, interpret):
  """The model's graph, its abstract parameters by path, and each one's sharding on ``mesh``
  by the rules (an empty dict when ``mesh`` is None): what loaders fill in."""
  abstract = nnx.eval_shape(lambda: MiniMaxM3(config, rngs=nnx.Rngs(0), dtype=dtype,
                                              param_dtype=param_dtype,
                                              implementation=implementation,
                                              interpret=interpret))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  if mesh is None:
    return graphdef, flat, {}
  shardings = sharding_lib.state_shardings(state, mesh, rules or sharding_lib.RULES)
  unwrap = lambda x: x.sharding if isinstance(x, nnx.Variable) else x
  return graphdef, flat, {p: unwrap(x) for p, x in nnx.to_flat_state(shardings)}


def load_hf(folder: str, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=None,
            implementation: str | None = "xla", interpret=False, progress: bool = True,
            check_finite: bool = True, expert_weights: str = "dense"):
  """Build a ``MiniMaxM3`` from a HF folder (config.json + safetensors).

  Parameters are placed on ``mesh`` by the sharding rules (one device when ``mesh`` is None).
  ``param_dtype`` defaults to ``dtype``; the router stays float32. With ``check_finite``
  (default) a tensor holding NaN or Inf is refused, naming it. ``expert_weights="mxfp8"``
  keeps the routed experts' weights in MXFP8 on the devices (``models.mxfp8``): as stored
  by an MXFP8 checkpoint, rounded to it from any other.
  """
  folder = os.fspath(folder)
  config = _config(folder).replace(expert_weights=expert_weights)
  param_dtype = param_dtype or dtype
  graphdef, flat, flat_shardings = _abstract_model(
      config, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
      implementation=implementation, interpret=interpret)
  sources = param_sources(config)
  tensors = _Tensors(folder)
  used = set()
  items = _progress(sources.items(), len(sources), "loading") if progress else sources.items()
  for path, srcs in items:
    var = flat[path]
    if var.dtype == mxfp8.VALUE_DTYPE:
      scale_path = path[:-1] + (path[-1] + "_scale",)
      values, scales = _assemble_mxfp8(tensors, srcs, var.shape, path, check_finite)
      for p, host in ((path, values), (scale_path, scales)):
        flat[p] = flat[p].replace(_place(host, flat_shardings.get(p)))
      used.update(name for name, _ in srcs)
      continue
    value = _assemble(tensors, srcs, var.shape, path)
    if check_finite:
      require_finite(tensors.raw_names[srcs[0][0]]
                     + (f" (or one of the {len(srcs) - 1} other experts stacked with it)"
                        if len(srcs) > 1 else ""), value, tensors.where(srcs[0][0]))
    used.update(name for name, _ in srcs)
    flat[path] = var.replace(_place(value.astype(var.dtype), flat_shardings.get(path)))
  used.update(n + "_scale_inv" for n in list(used))
  skipped = [n for n in tensors.files if n.startswith(SKIPPED_PREFIXES)]
  unexpected = sorted(n for n in tensors.files if n not in used and n not in skipped)
  tensors.close()
  if unexpected:
    raise CheckpointError(f"{folder}: {len(unexpected)} unexpected tensor(s) the config does not "
                          f"account for: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
  if skipped:
    log.info("skipped %d vision/projector/MTP tensors (text model only)", len(skipped))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return model


def random_init(config, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=None,
                implementation: str | None = "xla", interpret=False, seed: int = 0,
                expert_weights: str | None = None):
  """A model of ``config`` with random weights made directly on the devices (no files).

  Each parameter is drawn on its own, in its dtype and already in its sharding on ``mesh``
  (one device when None), so host memory stays flat and device memory never holds more than
  the weights: a full-size config can be tried without its checkpoint. Matrices are normal
  with std 1/sqrt(fan in) (the embedding 0.02), norms and biases zero, as ``MiniMaxM3``
  initialises them; the draws differ from ``MiniMaxM3(config, rngs=nnx.Rngs(seed))``'s.
  ``expert_weights="mxfp8"``: the routed experts' draws rounded to MXFP8, as ``load_hf``
  keeps them (None: as ``config`` says).
  """
  if isinstance(config, (str, os.PathLike)):
    config = (config_lib.from_hf_config(config) if str(config).endswith(".json")
              or os.path.isdir(config) else config_lib.preset(config))
  if expert_weights is not None:
    config = config.replace(expert_weights=expert_weights)
  param_dtype = param_dtype or dtype
  graphdef, flat, flat_shardings = _abstract_model(
      config, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype,
      implementation=implementation, interpret=interpret)
  key = jax.random.PRNGKey(seed)
  draws = {}
  for i, (path, var) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
    shape, dtype_ = tuple(var.shape), jnp.dtype(var.dtype)
    if path[-1].endswith("_scale"):
      continue  # drawn with its MXFP8 weight
    if len(shape) < 2:
      std = 0.0
    elif path == ("embed_tokens",):
      std = 0.02
    else:
      std = 1.0 / np.sqrt(shape[-2])
    scale_path = path[:-1] + (path[-1] + "_scale",)
    quantized = dtype_ == mxfp8.VALUE_DTYPE
    sh = (flat_shardings.get(path), flat_shardings.get(scale_path)) if quantized else (
        flat_shardings.get(path))
    fn = draws.get((shape, dtype_, std, sh))
    if fn is None:
      def make(k, shape=shape, dtype_=dtype_, std=std, quantized=quantized):
        if quantized:
          return mxfp8.quantize(jax.random.normal(k, shape, jnp.float32) * std)
        return jax.random.normal(k, shape, dtype_) * jnp.asarray(std, dtype_)
      fn = draws[(shape, dtype_, std, sh)] = jax.jit(make, out_shardings=sh)
    drawn = fn(jax.random.fold_in(key, i))
    if quantized:
      flat[path], flat[scale_path] = var.replace(drawn[0]), flat[scale_path].replace(drawn[1])
    else:
      flat[path] = var.replace(drawn)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- writing


def quantize_mxfp8(w: np.ndarray):
  """Per 32 input columns of ``w [out, in]``: a power-of-two scale (E8M0) so the block fits
  float8_e4m3fn (``models.mxfp8.quantize`` in the checkpoint's layout)."""
  values, scales = mxfp8.quantize(np.asarray(w, np.float32).T)
  return np.ascontiguousarray(values.T), np.ascontiguousarray(scales.T)


def hf_tensors(model: MiniMaxM3, *, dtype=ml_dtypes.bfloat16) -> Iterator[tuple[str, np.ndarray]]:
  """The model's parameters as (released HF name, array) pairs, one at a time."""
  config = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, srcs in param_sources(config).items():
    value = flat[path][...]
    scales = flat.get(path[:-1] + (path[-1] + "_scale",))
    if scales is not None:  # MXFP8 experts (expert_weights="mxfp8")
      value = mxfp8.dequantize(value, scales[...], jnp.float32)
    value = np.asarray(jnp.asarray(value, jnp.float32))
    router = path[-1] in ("gate", "e_score_correction_bias")
    out_dtype = np.float32 if router else dtype
    if srcs[0][1] == "experts":
      for (name, _), part in zip(srcs, value):
        yield PREFIX + name, np.ascontiguousarray(part.T).astype(out_dtype)
    else:
      (name, how), = srcs
      value = value.T if how == "linear" else value
      yield PREFIX + name, np.ascontiguousarray(value).astype(out_dtype)


def save_hf(model: MiniMaxM3, folder: str, hf_config: dict, *, num_shards: int = 2,
            mxfp8: bool = False, dtype=ml_dtypes.bfloat16):
  """Write ``model`` in the released layout: config.json, sharded safetensors, index.json.

  ``hf_config`` is the config.json to write (``from_hf_config`` of it must give
  ``model.config``). With ``mxfp8`` every Linear weight except the router is stored as
  float8_e4m3fn + uint8 ``weight_scale_inv``, like MiniMax-M3-MXFP8.
  """
  stored = model.config.replace(expert_weights="dense", index_score_dtype=None)  # not stored
  if config_lib.from_hf_config(hf_config) != stored:
    raise ValueError("hf_config does not describe this model's config")
  with _AtomicFolder(folder) as tmp:
    _write_hf(model, tmp, hf_config, num_shards=num_shards, mxfp8=mxfp8, dtype=dtype)


def _write_hf(model, folder, hf_config, *, num_shards, mxfp8, dtype):
  hf_config = dict(hf_config)
  if mxfp8:
    hf_config["quantization_config"] = {"quant_method": "mxfp8", "activation_scheme": "dynamic",
                                        "weight_block_size": [1, MXFP8_BLOCK]}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=1)
  tensors = []
  for name, value in hf_tensors(model, dtype=dtype):
    quantize = (mxfp8 and value.ndim == 2 and name.endswith("_proj.weight")
                or mxfp8 and ".experts." in name)
    if quantize:
      fp8, scale = quantize_mxfp8(value.astype(np.float32))
      tensors += [(name, fp8), (name + "_scale_inv", scale)]
    else:
      tensors.append((name, value))
  per_shard = -(-len(tensors) // num_shards)
  weight_map = {}
  for s in range(num_shards):
    file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    part = dict(tensors[s * per_shard:(s + 1) * per_shard])
    save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in part})
  total = sum(v.nbytes for _, v in tensors)
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def write_random(folder: str, *, config: str = "tiny", seed: int = 0, mxfp8: bool = False,
                 num_shards: int = 2, dtype: str = "bfloat16") -> str:
  """A random model of ``config`` (preset name or config.json path) in the released layout."""
  cfg = (config_lib.preset(config) if not str(config).endswith(".json")
         else config_lib.from_hf_config(config))
  model = create_model(cfg, seed=seed)
  store = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
  save_hf(model, folder, config_lib.to_hf_config(cfg), num_shards=num_shards, mxfp8=mxfp8,
          dtype=store)
  return folder


# ----------------------------------------------------------------------------- Orbax

ORBAX_STATE = "state"


def is_hf_folder(folder: str) -> bool:
  return any(os.path.exists(os.path.join(folder, f))
             for f in ("model.safetensors.index.json", "model.safetensors"))


def save_orbax(model: MiniMaxM3, folder: str):
  """An Orbax checkpoint of the parameters (sharded as they are) plus the HF config.json."""
  import orbax.checkpoint as ocp
  with _AtomicFolder(folder) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_lib.to_hf_config(model.config), f, indent=1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, ORBAX_STATE), nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()


def load_orbax(folder: str, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=None,
               implementation: str | None = "xla", interpret=False, check_finite: bool = True):
  """Restore a ``save_orbax`` checkpoint onto ``mesh`` (any mesh: Orbax reshards). A damaged
  checkpoint raises ``CheckpointError`` naming the folder (and the parameter where Orbax
  says which); with ``check_finite`` a parameter holding NaN or Inf is refused."""
  import orbax.checkpoint as ocp
  folder = os.path.abspath(folder)
  state_dir = os.path.join(folder, ORBAX_STATE)
  if not os.path.isdir(state_dir):
    raise CheckpointError(f"{folder}: no Orbax state folder {ORBAX_STATE!r}")
  config = _config(folder)
  abstract = nnx.eval_shape(lambda: MiniMaxM3(config, rngs=nnx.Rngs(0), dtype=dtype,
                                              param_dtype=param_dtype or dtype,
                                              implementation=implementation,
                                              interpret=interpret))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if mesh is None:
    mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  shardings = sharding_lib.state_shardings(params, mesh, rules or sharding_lib.RULES)
  target = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), params,
      shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  try:
    restored = ocp.StandardCheckpointer().restore(state_dir, target)
  except Exception as e:  # TensorStore, pytree and metadata errors of a damaged folder
    raise CheckpointError(f"{state_dir}: cannot restore the Orbax checkpoint (damaged, or "
                          f"made for another config?): {type(e).__name__}: "
                          f"{str(e)[:500]}") from None
  if check_finite:
    for path, var in nnx.to_flat_state(restored):
      require_finite(".".join(map(str, path)), var[...], state_dir)
  return nnx.merge(graphdef, restored, rest)


def load(folder: str, **kwargs):
  """A model from a HF folder or an Orbax checkpoint folder (detected by its contents)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    what = "no such folder" if not os.path.exists(folder) else "not a folder"
    raise CheckpointError(f"{folder}: {what} (expected a Hugging Face checkpoint folder or an "
                          "Orbax checkpoint folder)")
  if is_hf_folder(folder):
    return load_hf(folder, **kwargs)
  if not os.path.isdir(os.path.join(folder, ORBAX_STATE)):
    present = sorted(os.listdir(folder))[:10]
    raise CheckpointError(
        f"{folder}: not a checkpoint: a Hugging Face folder needs config.json with "
        f"model.safetensors.index.json (or model.safetensors), an Orbax one config.json with "
        f"a {ORBAX_STATE!r} folder; found {present or 'nothing'}")
  kwargs.pop("progress", None)
  if kwargs.pop("expert_weights", "dense") != "dense":
    raise CheckpointError(f"{folder}: MXFP8 experts (expert_weights='mxfp8') load from a "
                          "Hugging Face folder; this is an Orbax checkpoint (scripts/convert.py "
                          "orbax-to-hf makes one)")
  return load_orbax(folder, **kwargs)
