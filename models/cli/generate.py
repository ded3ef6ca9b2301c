"""Generate text with a MiniMax-M3-family model from a Hugging Face checkpoint folder.

Loads ``--checkpoint`` (config.json + safetensors, bf16 or MXFP8; default: a tiny model with
random weights, written once under ``~/.cache/msa-jax`` and reused: its output is noise),
places it on a device mesh, prefills the prompts (a batch of different lengths in one call)
and decodes with greedy or temperature/top-k/top-p sampling, streaming tokens as they come.
The last line reports prefill and decode tokens/s and peak device memory.

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

from models import cli

# JAX and the model load after the arguments are parsed (``_load_runtime``), so ``--help`` and
# argument errors answer at once.
jax = jnp = checkpoint = data = serving = sharding = load_tokenizer = None


def _load_runtime():
  global jax, jnp, checkpoint, data, serving, sharding, load_tokenizer
  import jax  # pylint: disable=redefined-outer-name
  import jax.numpy as jnp  # pylint: disable=redefined-outer-name
  from models import checkpoint, serving, sharding  # pylint: disable=redefined-outer-name
  from models import data  # pylint: disable=redefined-outer-name
  from models.data import load_tokenizer  # pylint: disable=redefined-outer-name


def stream_line(step, request, ids, tokenizer):
  """The streaming format of both paths: a request's new tokens, decoded, after a step."""
  print(f"[step {step}] request {request}: {tokenizer.decode([int(i) for i in ids])!r}",
        flush=True)


def show_results(prompts, generated, tokenizer):
  """Each prompt (a long one by its length only) and its completion, on lines of their own.
  Returns the completions' text."""
  texts = [tokenizer.decode(g) for g in generated]
  for i, (p, text) in enumerate(zip(prompts, texts)):
    shown = repr(tokenizer.decode(p)) if len(p) <= 200 else f"({len(p)} tokens)"
    print(f"prompt {i}: {shown}")
    print(f"completion {i}: {text!r}")
  return texts


def serve(model, prompts, args, mesh, tokenizer):
  """Continuous batching over a paged cache (see the module docstring): the generated ids per
  prompt, per-request records and timings."""
  bk = model.config.index_block_size
  budget = [len(p) + args.max_new_tokens for p in prompts]
  max_pages = -(-max(budget) // bk)
  # Prompts are prefilled in chunks of one fixed width (Bk times a power of two, at most
  # --prefill-chunk), so exactly two step shapes ever compile: the chunk and the decode block.
  longest = -(-max(len(p) for p in prompts) // bk)
  width = min(bk * (1 << (longest - 1).bit_length()), args.prefill_chunk)
  server = serving.PagedServer(
      model, rows=args.max_batch, num_pages=args.num_pages or args.max_batch * max_pages,
      max_pages=max_pages, prefill_width=width, decode_block=args.decode_block,
      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, mesh=mesh)

  def on_tokens(step, tokens):
    if not args.quiet:
      for i, toks in tokens.items():
        stream_line(step, i, toks, tokenizer)

  def on_refused(i, why):
    print(f"request {i} refused: {why}", file=sys.stderr, flush=True)

  stop_ids = args.stop_ids
  result = server.serve(prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        stop_ids=stop_ids, on_tokens=on_tokens, on_refused=on_refused)
  return result.generated, result.records, result.timings


def demo_checkpoint() -> str:
  """The default demo's tiny random model (float32, seed 0), written once into the user's
  cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``msa-jax/``) and reused."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  folder = os.path.join(root, "msa-jax", "tiny-m3-random-float32")
  if not checkpoint.is_hf_folder(folder):
    try:
      checkpoint.write_random(folder, dtype="float32")
    except Exception:  # pylint: disable=broad-except
      if not checkpoint.is_hf_folder(folder):  # not another process that wrote it first
        raise
  return folder


def eos_ids(folder: str) -> list[int]:
  """``eos_token_id`` (one id or a list) of the checkpoint's ``generation_config.json``; none
  when the folder has no such file."""
  path = os.path.join(folder, "generation_config.json")
  if not os.path.isfile(path):
    return []
  try:
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
  except (OSError, ValueError) as e:
    raise SystemExit(f"{path}: cannot read: {e}")
  eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
  if not all(isinstance(i, int) for i in eos):
    raise SystemExit(f"{path}: eos_token_id must be an integer or a list of them; got {eos!r}")
  return eos


def chat_formatter(folder: str | None, system: str | None):
  """``text -> the text the model reads``: ``text`` as the user's message (after ``system``,
  if given) through the checkpoint's chat template, ending where the assistant answers."""
  try:
    template = data.chat_template(folder) if folder else None
  except ValueError as e:  # an unreadable tokenizer_config.json
    raise SystemExit(f"--chat: {e}")
  if template is None:
    raise SystemExit(f"--chat: {folder or 'the model'} has no chat template (a "
                     f"chat_template in tokenizer_config.json, or chat_template.jinja)")
  head = [] if system is None else [{"role": "system", "content": system}]

  def render(text):
    try:
      return data.render_chat(template, head + [{"role": "user", "content": text}],
                              folder=folder)
    except ValueError as e:
      raise SystemExit(f"--chat: {e}")
  return render


def _parse_ids(text: str, where: str) -> list[int]:
  try:
    return [int(x) for x in text.replace(",", " ").split()]
  except ValueError:
    bad = next(x for x in text.replace(",", " ").split() if not x.lstrip("-").isdigit())
    raise SystemExit(f"{where}: expected comma-separated integers, got {bad!r}")


def read_prompts(inputs, tokenizer, chat=None) -> list[list[int]]:
  """Token ids of each ``(kind, value)`` prompt argument, in the order given. ``chat``
  (optional) turns a text prompt into the text the model reads (a rendered chat template)."""
  encode = (tokenizer.encode if chat is None else
            lambda text: tokenizer.encode(chat(text), add_special_tokens=False))
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
        prompts.append(encode(text))
      else:
        prompts.append(_parse_ids(text, f"{flag} {value}"))
    elif kind == "text":
      prompts.append(encode(value))
    else:
      prompts.append(_parse_ids(value, "--prompt-ids"))
  return prompts


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--checkpoint", default=None,
                      help="HF folder or Orbax checkpoint from scripts/convert.py (default: a "
                           "tiny model with random weights, cached under ~/.cache/msa-jax; "
                           "output is noise)")
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
  parser.add_argument("--chat", action="store_true",
                      help="each text prompt is a user message, formatted by the "
                           "checkpoint's chat template (tokenizer_config.json) so that the "
                           "model answers it")
  parser.add_argument("--system", default=None, metavar="TEXT",
                      help="with --chat: a system message before each prompt")
  parser.add_argument("--max-new-tokens", type=int, default=16,
                      help="tokens to generate per request (0: prefill only)")
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-p", type=float, default=1.0,
                      help="sample from the smallest set of tokens with this much probability")
  parser.add_argument("--top-k", type=int, default=0,
                      help="sample from the k most likely tokens only (0: no limit)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
  parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                      help="default: bfloat16 on GPUs and TPUs, float32 on CPUs")
  parser.add_argument("--weights", default="dense", choices=["dense", "mxfp8"],
                      help="the routed experts' weights on the devices: dense (in --dtype) or "
                           "mxfp8 (8-bit values and a scale per 32 inputs, as MiniMax-M3-MXFP8 "
                           "stores them; rounded to it from other checkpoints), dequantised "
                           "inside the expert matmuls")
  parser.add_argument("--mesh", default=None,
                      help="e.g. data=1,tensor=4,expert=2 (default: all devices on tensor)")
  parser.add_argument("--implementation", default=None,
                      choices=["xla", "pallas_gpu", "pallas_tpu"],
                      help="MSA implementation (default: the backend's best)")
  parser.add_argument("--output-json", default=None,
                      help="write prompt_ids, generated_ids and timings here")
  parser.add_argument("--warmup", action="store_true",
                      help="no effect (kept for old command lines): steps are compiled ahead "
                           "of time and compile time is reported apart from the rates")
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
  parser.add_argument("--stop-id", type=int, action="append", default=None,
                      help="a request ends early when it produces this token id (repeatable; "
                           "default: the checkpoint's eos_token_id from "
                           "generation_config.json, if it has one)")
  parser.add_argument("--ignore-eos", action="store_true",
                      help="do not stop at the checkpoint's eos_token_id")
  parser.add_argument("--quiet", action="store_true", help="no streaming output")
  return parser


def main(argv=None, *, compilation_cache=False):
  """The CLI; ``compilation_cache``: keep compiled programs on disk (command-line runs)."""
  args = build_parser().parse_args(argv)
  _load_runtime()
  if compilation_cache:
    cli.enable_compilation_cache()  # reruns skip most compilation
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  folder, tokenizer, prompts = _check_args(args)
  model, mesh, folder = _load_model(args, folder, prompts)
  if args.max_batch is not None:
    return _serve_queue(model, prompts, args, mesh, tokenizer, folder)
  return generate_static(model, prompts, tokenizer, args, mesh, folder)


def _check_args(args):
  """Validate the command line and read the prompts: (checkpoint folder or None, tokenizer,
  prompts as id lists). SystemExit with a message on bad input."""
  args.dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  if args.dtype == "float32":  # true float32 matmuls (GPUs would otherwise use TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
  if args.prefill_chunk < 1 or args.decode_block < 1:
    raise SystemExit("--prefill-chunk and --decode-block must be >= 1")
  if args.max_new_tokens < 0:
    raise SystemExit(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
  try:
    serving.check_sampling(args.temperature, args.top_p, args.top_k)
  except ValueError as e:
    raise SystemExit(f"--temperature/--top-p/--top-k: {e}")
  if args.checkpoint is not None and args.random_weights is not None:
    raise SystemExit("--checkpoint and --random-weights exclude each other")
  if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
    what = "does not exist" if not os.path.exists(args.checkpoint) else "is a file"
    raise SystemExit(f"--checkpoint {args.checkpoint}: {what}; expected a folder (a Hugging "
                     f"Face checkpoint with config.json and safetensors, or an Orbax "
                     f"checkpoint from scripts/convert.py)")
  folder = args.checkpoint
  if folder is None and args.random_weights is None:
    folder = demo_checkpoint()
    print(f"no --checkpoint: a tiny model with random weights ({folder}); its output is "
          f"noise. Pass --checkpoint for a real model.", file=sys.stderr, flush=True)
  tokenizer = load_tokenizer(folder)
  chat = chat_formatter(folder, args.system) if args.chat else None
  if args.system is not None and not args.chat:
    raise SystemExit("--system needs --chat")
  if chat is not None and any(kind in ("ids", "ids_file") for kind, _ in args.inputs):
    raise SystemExit("--chat applies to text prompts (--prompt, --prompt-file), not to ids")
  prompts = read_prompts(args.inputs, tokenizer, chat)
  if not prompts:
    prompts = read_prompts([("text", "The quick brown fox")], tokenizer, chat)
  if any(not p for p in prompts):
    raise SystemExit("every prompt needs at least one token")
  return folder, tokenizer, prompts


def _load_model(args, folder, prompts):
  """(model, mesh, checkpoint label) on the --mesh, from --checkpoint or --random-weights;
  the prompts are checked against its vocabulary and context length."""
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(
        args.mesh, {"data": 1, "tensor": jax.device_count(), "expert": 1}))
  except ValueError as e:
    raise SystemExit(f"--mesh: {e}")
  if args.random_weights is not None:
    try:
      model = checkpoint.random_init(args.random_weights, mesh=mesh, dtype=dtype,
                                     implementation=args.implementation, seed=args.seed,
                                     expert_weights=args.weights)
    except (ValueError, OSError) as e:
      raise SystemExit(f"--random-weights {args.random_weights}: {e}")
    folder = f"random:{args.random_weights}"
  else:
    try:
      model = checkpoint.load(folder, mesh=mesh, dtype=dtype,
                              implementation=args.implementation, progress=not args.quiet,
                              expert_weights=args.weights)
    except checkpoint.CheckpointError as e:
      raise SystemExit(f"--checkpoint: {e}")
  args.stop_ids = (args.stop_id if args.stop_id is not None else
                   [] if args.ignore_eos else eos_ids(folder))
  vocab = model.config.vocab_size
  if any(i < 0 or i >= vocab for p in prompts for i in p):
    raise SystemExit(f"prompt token ids must lie in [0, {vocab})")
  limit = model.config.max_position_embeddings
  longest = max(len(p) for p in prompts)
  if limit is not None and longest + args.max_new_tokens > limit:
    raise SystemExit(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} "
                     f"exceeds the model's max_position_embeddings ({limit}, from its "
                     f"config.json)")
  return model, mesh, folder


def _serve_queue(model, prompts, args, mesh, tokenizer, folder):
  """--max-batch: the prompts as a queue of requests over a paged cache (continuous
  batching); prints the rates, writes --output-json; exit status 1 if none was served."""
  if args.max_batch < 1 or (args.num_pages is not None and args.num_pages < 1):
    raise SystemExit("--max-batch and --num-pages must be >= 1")
  bk = model.config.index_block_size
  if args.prefill_chunk < bk or args.prefill_chunk % bk:
    raise SystemExit(f"--prefill-chunk must be a positive multiple of the block size {bk}; "
                     f"got {args.prefill_chunk}")
  with sharding.activation_sharding(mesh):
    generated, records, timings = serve(model, prompts, args, mesh, tokenizer)
  result = {"prompt_ids": prompts, "generated_ids": generated, "requests": records,
            "mesh": dict(mesh.shape), "checkpoint": folder, "dtype": args.dtype,
            "weights": args.weights, **timings}
  result["generated_text"] = show_results(prompts, generated, tokenizer)
  rate = lambda x: "n/a" if x is None else f"{x:.1f} tok/s"
  peak = max(_peak_memory(), default=-1)
  result["peak_bytes"] = peak
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(result, f, indent=1)
  memory = f"{peak / 2**30:.2f} GiB" if peak >= 0 else "n/a"
  refused = sum("refused" in r for r in records)
  served = len(prompts) - refused
  print(f"served {served} requests ({refused} refused) in {timings['steps']} steps: prefill "
        f"{rate(timings['prefill_tokens_per_s'])}, decode {rate(timings['decode_tokens_per_s'])}"
        f", compile {timings['compile_s']:.1f} s (not in the rates), peak memory {memory}")
  if not served:
    print("no request could be served (every one was refused: see above)", file=sys.stderr)
    return 1
  return 0


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
                          top_p=args.top_p, top_k=args.top_k, mesh=mesh)
  stop_ids = args.stop_ids
  bar = None
  if not args.quiet and longest > gen.prefill_chunk:
    from tqdm import tqdm
    bar = tqdm(total=longest, desc="prefill", unit="tok")

  def progress(done, total):
    bar.update(done - bar.n)

  steps_done = [0]

  def stream(block):  # [batch, steps] new tokens
    steps_done[0] += block.shape[1]
    if not args.quiet:
      for i, ids in enumerate(block):
        stream_line(steps_done[0], i, ids, tokenizer)

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
      "weights": args.weights,
  }
  result["generated_text"] = show_results(prompts, generated, tokenizer)
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(result, f, indent=1)
  memory = f"{peak / 2**30:.2f} GiB" if peak >= 0 else "n/a"
  rate = lambda x: "n/a" if x is None else f"{x:.1f} tok/s"
  print(f"prefill {rate(result['prefill_tokens_per_s'])} ({sum(map(len, prompts))} tokens), "
        f"decode {rate(result['decode_tokens_per_s'])}, compile {t['compile_s']:.1f} s "
        f"(not in the rates), peak memory {memory}")
  return 0


run = cli.console_command(lambda: main(compilation_cache=True))


if __name__ == "__main__":
  run()
