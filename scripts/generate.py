"""Generate text with a MiniMax-M3-family model from a Hugging Face checkpoint folder.

Loads ``--checkpoint`` (config.json + safetensors, bf16 or MXFP8; default: a tiny random model
written on the fly), places it on a device mesh, prefills the prompts (a batch of different
lengths in one call) and decodes with greedy or temperature/top-p sampling, streaming tokens as
they come. The last line reports prefill and decode tokens/s and peak device memory.

Prompts: ``--prompt TEXT`` (tokenised with the folder's tokenizer.json through the
``tokenizers`` library, or as raw bytes when the folder has none), ``--prompt-ids 5,17,42``,
or from files for long prompts: ``--prompt-file PATH`` (text) and ``--prompt-ids-file PATH``
(ids separated by commas or whitespace), ``-`` for standard input; repeat any of them for a
batch. Prompts are prefilled in chunks of ``--prefill-chunk`` tokens (only the last token's
logits are computed), and decoding runs ``--decode-block`` steps per device call with the
sampling on the device. Compilation happens before the timed work and is reported apart.

Continuous batching (``--max-batch N``): the prompts become a queue of requests served by N
batch rows over a paged KV / index-key cache (``--num-pages`` pages of ``Bk`` tokens, handed out
by ``msa_jax.PageAllocator``). A request is admitted when a row is free and pages for its prompt
plus ``--max-new-tokens`` can be reserved; it is prefilled into its pages in chunks of
``--prefill-chunk`` tokens while the others wait, then decodes with them, and leaves (its pages
freed) when it has its tokens or produced ``--stop-id``. A request that waits for pages is
admitted later; one that could never fit is refused with a message, and the others go on. MSA
layers decode from the selected pages only.

Multi-host: call with the usual ``jax.distributed`` environment variables set
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) on every host;
``jax.distributed.initialize()`` then runs first and the mesh spans all hosts' devices.

Examples:
  python3 scripts/generate.py --prompt-ids 5,17,42 --max-new-tokens 8
  python3 scripts/generate.py --checkpoint /data/MiniMax-M3 --prompt "Hello" \\
      --mesh data=1,tensor=8,expert=1 --dtype bfloat16
  python3 scripts/generate.py --prompt-ids 5,17,42 --prompt-ids 7,8 --prompt-ids 9 \\
      --max-batch 2 --num-pages 8          # continuous batching over a paged cache
  python3 scripts/generate.py --checkpoint /data/gen-1b --prompt-ids-file long_prompt.txt \\
      --dtype bfloat16 --prefill-chunk 16384 --max-new-tokens 64   # a 128K-token prompt
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

import msa_jax
from models import cache as cache_lib
from models import checkpoint
from models import serving
from models import sharding
from models.data import ByteTokenizer, load_tokenizer
from models.serving import sample


def serve(model, prompts, args, dtype, mesh):
  """Continuous batching over a paged cache (see the module docstring). Returns
  (generated ids per prompt, per-request records, timings)."""
  cfg = model.config
  bk = cfg.index_block_size
  budget = [len(p) + args.max_new_tokens for p in prompts]
  max_pages = -(-max(budget) // bk)
  num_pages = args.num_pages or args.max_batch * max_pages
  rows = args.max_batch
  alloc = msa_jax.PageAllocator(num_pages, bk, rows, max_pages)
  cache = cache_lib.init_paged_cache(cfg, num_pages=num_pages, batch=rows, max_pages=max_pages,
                                     dtype=dtype)

  @nnx.jit
  def step(model, tokens, cache, num_new):
    logits, cache = model(tokens, cache, num_new)
    last = jnp.take_along_axis(logits, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)
    return last[:, 0], cache

  # Prompts are prefilled in chunks of one fixed width (Bk times a power of two, at most
  # --prefill-chunk), so exactly two step shapes ever compile: the chunk and the decode step.
  longest = -(-max(len(p) for p in prompts) // bk)
  width = min(bk * (1 << (longest - 1).bit_length()), args.prefill_chunk)

  queue = list(range(len(prompts)))
  active: dict[int, int] = {}  # row -> request
  generated = [[] for _ in prompts]
  records = [{"request": i, "prompt_len": len(p)} for i, p in enumerate(prompts)]
  key = jax.random.PRNGKey(args.seed)
  next_token = np.zeros(rows, np.int32)
  step_no, prefill_tokens, prefill_s, decode_tokens, decode_s = 0, 0, 0.0, 0, 0.0

  # The cache is kept in the layout (sharding) that steps return, so no step compiles twice;
  # one step with num_new = 0 (it writes nothing) makes sure of it on any mesh.
  layout = sharding.paged_cache_shardings(cache, mesh)
  cache = jax.device_put(cache, layout)

  def set_rows(cache, reset_rows):
    lengths = cache.lengths
    if reset_rows:
      lengths = lengths.at[jnp.asarray(reset_rows)].set(0)
    return cache._replace(page_table=jax.device_put(alloc.table(), layout.page_table),
                          lengths=lengths)

  idle = jnp.zeros(rows, jnp.int32)
  _, cache = step(model, jnp.zeros((rows, 1), jnp.int32), set_rows(cache, []), idle)
  if args.warmup:  # compile the prefill chunk (and run it, writing nothing) untimed
    jax.block_until_ready(step(model, jnp.zeros((rows, width), jnp.int32),
                               set_rows(cache, []), idle))

  def take(logits, live_rows):
    nonlocal key
    key, sub = jax.random.split(key)
    host = np.asarray(sample(logits, sub, args.temperature, args.top_p))
    finished = []
    for row in live_rows:
      i = active[row]
      tok = int(host[row])
      generated[i].append(tok)
      next_token[row] = tok
      if not args.quiet:
        print(f"[step {step_no}] request {i}: {tok}", flush=True)
      if len(generated[i]) >= args.max_new_tokens or tok == args.stop_id:
        finished.append(row)
    for row in finished:  # leaves: its pages go back to the pool
      records[active.pop(row)]["finished_step"] = step_no
      alloc.free(row)
    return finished

  while queue or active:
    admitted = []
    while queue:
      i = queue[0]
      if alloc.pages_for(budget[i]) > num_pages:
        queue.pop(0)
        records[i]["refused"] = (f"needs {alloc.pages_for(budget[i])} pages of {bk} tokens "
                                 f"(prompt {len(prompts[i])} + {args.max_new_tokens} new); "
                                 f"the cache has {num_pages}")
        print(f"request {i} refused: {records[i]['refused']}", file=sys.stderr, flush=True)
        continue
      row = alloc.admit(len(prompts[i]), reserve_tokens=budget[i])
      if row is None:  # no free row or pages: wait for a request to leave
        break
      queue.pop(0)
      active[row] = i
      admitted.append(row)
      records[i].update(row=row, admitted_step=step_no)
    freed = []
    if admitted:  # prefill the newcomers chunk by chunk; the other rows are left alone
      cache = set_rows(cache, admitted)
      prompt_of = {r: prompts[active[r]] for r in admitted}  # a row may leave between chunks
      for start in range(0, max(map(len, prompt_of.values())), width):
        tokens = np.zeros((rows, width), np.int32)
        num_new = np.zeros(rows, np.int32)
        for r, p in prompt_of.items():
          chunk = p[start:start + width]
          tokens[r, :len(chunk)], num_new[r] = chunk, len(chunk)
        t0 = time.perf_counter()
        logits, cache = step(model, jnp.asarray(tokens), cache, jnp.asarray(num_new))
        logits.block_until_ready()
        prefill_s += time.perf_counter() - t0
        prefill_tokens += int(num_new.sum())
        done = [r for r, p in prompt_of.items() if start < len(p) <= start + width]
        freed += take(logits, done)  # a prompt's last chunk gives its first new token
        step_no += 1
    decoding = [r for r in active]
    if decoding:  # one decode step for every live request
      for r in decoding:
        if not alloc.grow(r, int(len(prompts[active[r]]) + len(generated[active[r]]))):
          raise RuntimeError("a reserved page was not available")  # the allocator's promise
      num_new = np.zeros(rows, np.int32)
      num_new[decoding] = 1
      cache = set_rows(cache, freed)
      t0 = time.perf_counter()
      logits, cache = step(model, jnp.asarray(next_token[:, None]), cache,
                           jnp.asarray(num_new))
      logits.block_until_ready()
      decode_s += time.perf_counter() - t0
      decode_tokens += len(decoding)
      take(logits, decoding)
      step_no += 1
    elif queue and not admitted:
      raise RuntimeError("requests wait but nothing runs")  # cannot happen: see admit above
  timings = {"prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
             "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
             "prefill_s": prefill_s, "decode_s": decode_s, "steps": step_no,
             "num_pages": num_pages, "max_batch": rows,
             "includes_compilation": not args.warmup}
  return generated, records, timings


def _parse_ids(text: str, where: str) -> list[int]:
  try:
    return [int(x) for x in text.replace(",", " ").split()]
  except ValueError:
    bad = next(x for x in text.replace(",", " ").split() if not x.lstrip("-").isdigit())
    raise SystemExit(f"{where}: expected comma-separated integers, got {bad!r}")


def read_prompts(inputs, tokenizer) -> list[list[int]]:
  """Token ids of each ``(kind, value)`` prompt argument, in the order given."""
  prompts = []
  stdin_used = False
  for kind, value in inputs:
    if kind in ("text_file", "ids_file"):
      flag = "--prompt-file" if kind == "text_file" else "--prompt-ids-file"
      if value == "-":
        if stdin_used:
          raise SystemExit(f"{flag} -: standard input can be read only once")
        stdin_used = True
        text = sys.stdin.read()
      else:
        try:
          with open(value, encoding="utf-8") as f:
            text = f.read()
        except OSError as e:
          raise SystemExit(f"{flag} {value}: cannot read: {e.strerror}")
      if kind == "text_file":
        prompts.append(tokenizer.encode(text))
      else:
        prompts.append(_parse_ids(text, f"{flag} {value}"))
    elif kind == "text":
      prompts.append(tokenizer.encode(value))
    else:
      prompts.append(_parse_ids(value, "--prompt-ids"))
  return prompts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=None,
                      help="HF folder or Orbax checkpoint from scripts/convert.py (default: a "
                           "tiny random model made on the fly)")
  parser.add_argument("--random-weights", default=None, metavar="CONFIG",
                      help="no checkpoint: random weights of CONFIG (a preset name such as "
                           "gen_1b or m3_slice, or a config.json) made directly on the "
                           "devices, in their shardings (for sizing and speed; output is "
                           "noise; prompts are bytes or ids)")
  tagged = lambda kind: (lambda value: (kind, value))
  parser.add_argument("--prompt", dest="inputs", action="append", type=tagged("text"),
                      default=[], metavar="TEXT", help="prompt text (repeatable)")
  parser.add_argument("--prompt-ids", dest="inputs", action="append", type=tagged("ids"),
                      metavar="IDS", help="comma-separated token ids (repeatable)")
  parser.add_argument("--prompt-file", dest="inputs", action="append",
                      type=tagged("text_file"), metavar="PATH",
                      help="a file of prompt text, tokenised whole ('-' = standard input; "
                           "repeatable): for prompts too long for the command line")
  parser.add_argument("--prompt-ids-file", dest="inputs", action="append",
                      type=tagged("ids_file"), metavar="PATH",
                      help="a file of token ids separated by commas or whitespace ('-' = "
                           "standard input; repeatable). Prompts are taken in the order given")
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
                      help="with --max-batch: compile the prefill chunk and the decode step "
                           "before the timed work (the static path always compiles ahead of "
                           "time and reports compile time apart)")
  parser.add_argument("--max-batch", type=int, default=None,
                      help="continuous batching: serve the prompts as a queue of requests "
                           "with this many batch rows over a paged cache")
  parser.add_argument("--num-pages", type=int, default=None,
                      help="pages of Bk tokens in the paged cache (default: enough for "
                           "--max-batch requests of the longest prompt + new tokens)")
  parser.add_argument("--prefill-chunk", type=int, default=8192,
                      help="prompts are prefilled in chunks of at most this many tokens (one "
                           "compiled width; with --max-batch a multiple of the block size; "
                           "default 8192)")
  parser.add_argument("--decode-block", type=int, default=16,
                      help="decode steps per device call (sampling on the device; tokens "
                           "stream per block; default 16)")
  parser.add_argument("--stop-id", type=int, default=None,
                      help="a request ends early when it produces this token id")
  parser.add_argument("--quiet", action="store_true", help="no streaming output")
  args = parser.parse_args(argv)

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  if args.dtype == "float32":  # true float32 matmuls (GPUs would otherwise use TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
  if args.prefill_chunk < 1 or args.decode_block < 1:
    raise SystemExit("--prefill-chunk and --decode-block must be >= 1")
  if args.checkpoint is not None and args.random_weights is not None:
    raise SystemExit("--checkpoint and --random-weights exclude each other")
  folder = args.checkpoint
  if folder is None and args.random_weights is None:
    folder = checkpoint.write_random(os.path.join(tempfile.mkdtemp(), "tiny-m3"),
                                     dtype="float32")
  tokenizer = load_tokenizer(folder)
  prompts = read_prompts(args.inputs, tokenizer)
  if not prompts:
    prompts = [tokenizer.encode("The quick brown fox")]
  if any(not p for p in prompts):
    raise SystemExit("every prompt needs at least one token")

  mesh = sharding.make_mesh(sharding.parse_mesh(
      args.mesh, {"data": 1, "tensor": jax.device_count(), "expert": 1}))
  if args.random_weights is not None:
    try:
      model = checkpoint.random_init(args.random_weights, mesh=mesh, dtype=dtype,
                                     implementation=args.implementation, seed=args.seed)
    except (ValueError, OSError) as e:
      raise SystemExit(f"--random-weights {args.random_weights}: {e}")
    folder = f"random:{args.random_weights}"
  else:
    model = checkpoint.load(folder, mesh=mesh, dtype=dtype,
                            implementation=args.implementation, progress=not args.quiet)
  vocab = model.config.vocab_size
  if any(i < 0 or i >= vocab for p in prompts for i in p):
    raise SystemExit(f"prompt token ids must lie in [0, {vocab})")

  if args.max_batch is not None:
    if args.max_batch < 1 or (args.num_pages is not None and args.num_pages < 1):
      raise SystemExit("--max-batch and --num-pages must be >= 1")
    bk = model.config.index_block_size
    if args.prefill_chunk < bk or args.prefill_chunk % bk:
      raise SystemExit(f"--prefill-chunk must be a positive multiple of the block size {bk}; "
                       f"got {args.prefill_chunk}")
    with sharding.activation_sharding(mesh):
      generated, records, timings = serve(model, prompts, args, dtype, mesh)
    result = {"prompt_ids": prompts, "generated_ids": generated, "requests": records,
              "mesh": dict(mesh.shape), "checkpoint": folder, "dtype": args.dtype, **timings}
    if args.output_json:
      with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)
    for i, p in enumerate(prompts):
      print(f"prompt {i}: {tokenizer.decode(p + generated[i])!r}")
    rate = lambda x: "n/a" if x is None else f"{x:.1f} tok/s"
    print(f"served {len(prompts)} requests in {timings['steps']} steps: prefill "
          f"{rate(timings['prefill_tokens_per_s'])}, decode {rate(timings['decode_tokens_per_s'])}"
          f"{'' if args.warmup else ' (incl. compilation)'}")
    return 0

  return generate_static(model, prompts, tokenizer, args, mesh, folder)


def _peak_memory():
  try:
    return [int(d.memory_stats().get("peak_bytes_in_use", 0)) for d in jax.local_devices()]
  except Exception:  # CPU backends without memory stats
    return []


def generate_static(model, prompts, tokenizer, args, mesh, folder):
  """One batch of all prompts: chunked prefill, then decode in jitted blocks of steps."""
  batch = len(prompts)
  longest = max(len(p) for p in prompts)
  gen = serving.Generator(model, batch=batch, max_len=longest + args.max_new_tokens,
                          prefill_chunk=min(args.prefill_chunk, serving.round_up(longest, 16)),
                          decode_block=args.decode_block, temperature=args.temperature,
                          top_p=args.top_p, mesh=mesh)
  stop_ids = [] if args.stop_id is None else [args.stop_id]
  bar = None
  if not args.quiet and longest > gen.prefill_chunk:
    from tqdm import tqdm
    bar = tqdm(total=longest, desc="prefill", unit="tok")

  def progress(done, total):
    bar.update(done - bar.n)

  def stream(block):
    if args.quiet:
      return
    for step in range(block.shape[1]):
      text = " | ".join(tokenizer.decode([int(t)]) if not isinstance(tokenizer, ByteTokenizer)
                        else str(int(t)) for t in block[:, step])
      print(text, flush=True)

  with sharding.activation_sharding(mesh):
    cache = gen.init_cache()
    gen.compile(cache)
    logits, cache = gen.prefill(prompts, cache, progress=progress if bar else None)
    if bar is not None:
      bar.close()
    tokens, cache = gen.decode(logits, cache, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, stop_ids=stop_ids, on_block=stream)
  generated = serving.trim(tokens, stop_ids)
  peaks = _peak_memory()
  peak = max(peaks, default=-1)
  t = gen.timings.as_dict()
  result = {
      "prompt_ids": prompts, "generated_ids": generated,
      "prompt_lengths": [len(p) for p in prompts],
      "prefill_tokens_per_s": t["prefill_tokens_per_s"],
      "decode_tokens_per_s": t["decode_tokens_per_s"],
      "prefill_s": t["prefill_s"], "decode_s": t["decode_s"], "compile_s": t["compile_s"],
      "prefill_chunk": gen.prefill_chunk, "decode_block": gen.decode_block,
      "peak_bytes": int(peak), "peak_bytes_per_device": peaks,
      "mesh": dict(mesh.shape), "checkpoint": folder, "dtype": args.dtype,
  }
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(result, f, indent=1)
  for b in range(batch):
    if len(prompts[b]) > 200:  # a long prompt is not echoed whole
      print(f"prompt {b} ({len(prompts[b])} tokens) -> {tokenizer.decode(generated[b])!r}")
    else:
      print(f"prompt {b}: {tokenizer.decode(prompts[b] + generated[b])!r}")
  memory = f"{peak / 2**30:.2f} GiB" if peak >= 0 else "n/a"
  rate = lambda x: "n/a" if x is None else f"{x:.1f} tok/s"
  print(f"prefill {rate(result['prefill_tokens_per_s'])} ({sum(map(len, prompts))} tokens), "
        f"decode {rate(result['decode_tokens_per_s'])}, compile {t['compile_s']:.1f} s "
        f"(not in the rates), peak memory {memory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
