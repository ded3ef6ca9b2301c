"""Generate text with a MiniMax-M3-family model from a Hugging Face checkpoint folder.

Loads ``--checkpoint`` (config.json + safetensors, bf16 or MXFP8; default: a tiny random model
written on the fly), places it on a device mesh, prefills the prompts (a batch of different
lengths in one call) and decodes with greedy or temperature/top-p sampling, streaming tokens as
they come. The last line reports prefill and decode tokens/s and peak device memory.

Prompts: ``--prompt TEXT`` (tokenised with the folder's tokenizer.json through the
``tokenizers`` library, or as raw bytes when the folder has none) or ``--prompt-ids 5,17,42``;
repeat either flag for a batch.

Multi-host: call with the usual ``jax.distributed`` environment variables set
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) on every host;
``jax.distributed.initialize()`` then runs first and the mesh spans all hosts' devices.

Examples:
  python3 scripts/generate.py --prompt-ids 5,17,42 --max-new-tokens 8
  python3 scripts/generate.py --checkpoint /data/MiniMax-M3 --prompt "Hello" \\
      --mesh data=1,tensor=8,expert=1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import cache as cache_lib
from models import checkpoint
from models import sharding


class ByteTokenizer:
  """Fallback when the checkpoint has no tokenizer.json: one token per UTF-8 byte."""

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  def __init__(self, path):
    from tokenizers import Tokenizer
    self.tok = Tokenizer.from_file(path)

  def encode(self, text):
    return self.tok.encode(text).ids

  def decode(self, ids):
    return self.tok.decode(list(ids))


def load_tokenizer(folder):
  path = os.path.join(folder, "tokenizer.json")
  return HFTokenizer(path) if os.path.exists(path) else ByteTokenizer()


def parse_mesh(text: str | None):
  if not text:
    return {"data": 1, "tensor": jax.device_count(), "expert": 1}
  axes = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if name not in ("data", "fsdp", "tensor", "expert") or not size.isdigit():
      raise SystemExit(f"--mesh: expected name=size with names data/fsdp/tensor/expert, "
                       f"got {part!r}")
    axes[name] = int(size)
  return axes


def sample(logits, key, temperature: float, top_p: float):
  """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-p sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the top token
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None,
                      help="HF folder or Orbax checkpoint from scripts/convert.py (default: a "
                           "tiny random model made on the fly)")
  parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
  parser.add_argument("--prompt-ids", action="append", default=[],
                      help="comma-separated token ids (repeatable)")
  parser.add_argument("--max-new-tokens", type=int, default=16)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
  parser.add_argument("--mesh", default=None,
                      help="e.g. data=1,tensor=4,expert=2 (default: all devices on tensor)")
  parser.add_argument("--implementation", default=None,
                      choices=["xla", "pallas_gpu", "pallas_tpu"],
                      help="MSA implementation (default: the backend's best)")
  parser.add_argument("--output-json", default=None,
                      help="write prompt_ids, generated_ids and timings here")
  parser.add_argument("--warmup", action="store_true",
                      help="run the prefill once untimed first, so prefill tokens/s excludes "
                           "compilation")
  parser.add_argument("--quiet", action="store_true", help="no streaming output")
  args = parser.parse_args(argv)

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  if args.dtype == "float32":  # true float32 matmuls (GPUs would otherwise use TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
  folder = args.checkpoint
  if folder is None:
    folder = checkpoint.write_random(os.path.join(tempfile.mkdtemp(), "tiny-m3"),
                                     dtype="float32")
  tokenizer = load_tokenizer(folder)
  prompts = [tokenizer.encode(p) for p in args.prompt]
  for ids in args.prompt_ids:
    try:
      prompts.append([int(x) for x in ids.split(",") if x.strip()])
    except ValueError:
      raise SystemExit(f"--prompt-ids: expected comma-separated integers, got {ids!r}")
  if not prompts:
    prompts = [tokenizer.encode("The quick brown fox")]
  if any(not p for p in prompts):
    raise SystemExit("every prompt needs at least one token")

  mesh = sharding.make_mesh(parse_mesh(args.mesh))
  model = checkpoint.load(folder, mesh=mesh, dtype=dtype, implementation=args.implementation,
                          progress=not args.quiet)
  vocab = model.config.vocab_size
  if any(i < 0 or i >= vocab for p in prompts for i in p):
    raise SystemExit(f"prompt token ids must lie in [0, {vocab})")

  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = int(lengths.max())
  tokens = np.zeros((batch, width), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  cache = cache_lib.init_cache(model.config, batch, width + args.max_new_tokens, dtype)
  cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh))

  @nnx.jit
  def prefill(model, tokens, cache, num_new):
    logits, cache = model(tokens, cache, num_new)
    last = jnp.take_along_axis(logits, (num_new - 1)[:, None, None], axis=1)[:, 0]
    return last, cache

  @nnx.jit
  def decode(model, token, cache):
    logits, cache = model(token[:, None], cache)
    return logits[:, 0], cache

  key = jax.random.PRNGKey(args.seed)
  with sharding.activation_sharding(mesh):
    if args.warmup:  # compile (and run) the prefill once untimed
      jax.block_until_ready(prefill(model, jnp.asarray(tokens), cache, jnp.asarray(lengths)))
    t0 = time.perf_counter()
    logits, cache = prefill(model, jnp.asarray(tokens), cache, jnp.asarray(lengths))
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    generated = [[] for _ in range(batch)]
    t0, timed_steps = time.perf_counter(), 0
    for step in range(args.max_new_tokens):
      if step == 1:  # the first decode call compiled the step: time the ones after it
        jax.block_until_ready(logits)
        t0, timed_steps = time.perf_counter(), 0
      key, sub = jax.random.split(key)
      nxt = sample(logits, sub, args.temperature, args.top_p)
      host = np.asarray(nxt)
      for b in range(batch):
        generated[b].append(int(host[b]))
      if not args.quiet:
        text = " | ".join(tokenizer.decode([int(t)]) if not isinstance(tokenizer, ByteTokenizer)
                          else str(int(t)) for t in host)
        print(f"[{step}] {text}", flush=True)
      if step + 1 < args.max_new_tokens:
        logits, cache = decode(model, nxt, cache)
        timed_steps += step >= 1
    jax.block_until_ready(logits)
    decode_s = time.perf_counter() - t0

  try:
    peaks = [int(d.memory_stats().get("peak_bytes_in_use", 0)) for d in jax.local_devices()]
  except Exception:  # CPU backends without memory stats
    peaks = []
  peak = max(peaks, default=-1)
  result = {
      "prompt_ids": prompts, "generated_ids": generated,
      "prefill_tokens_per_s": float(lengths.sum() / prefill_s),
      "decode_tokens_per_s": (float(batch * timed_steps / decode_s) if timed_steps
                              else None),
      "prefill_s": prefill_s, "prefill_includes_compilation": not args.warmup,
      "decode_s": decode_s, "peak_bytes": int(peak), "peak_bytes_per_device": peaks,
      "mesh": dict(mesh.shape), "checkpoint": folder, "dtype": args.dtype,
  }
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(result, f, indent=1)
  for b in range(batch):
    print(f"prompt {b}: {tokenizer.decode(prompts[b] + generated[b])!r}")
  memory = f"{peak / 2**30:.2f} GiB" if peak >= 0 else "n/a"
  decode_rate = result["decode_tokens_per_s"]
  decode_rate = "n/a" if decode_rate is None else f"{decode_rate:.1f} tok/s"
  compiled = "" if args.warmup else " (incl. compilation)"
  print(f"prefill {result['prefill_tokens_per_s']:.1f} tok/s{compiled}, decode "
        f"{decode_rate} (after the first step), peak memory {memory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
