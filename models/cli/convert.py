"""Convert MiniMax-M3-family checkpoints between the Hugging Face layout and Orbax.

  hf-to-orbax SRC DST     HF folder (bf16 or MXFP8) -> Orbax checkpoint (+ config.json),
                          saved sharded over --mesh; restorable onto any other mesh.
  orbax-to-hf SRC DST     Orbax checkpoint -> HF folder in the released layout
                          (bit-exact round trip for a bf16 source loaded with --dtype bfloat16).

DST must not exist (or be empty): nothing is written otherwise. The output is written to a
temporary sibling folder and renamed to DST at the end, so a failure leaves no partial DST.
Tensors holding NaN or Inf are refused, naming them.

Examples:
  python3 scripts/convert.py hf-to-orbax /data/MiniMax-M3 /data/m3-orbax --mesh tensor=8
  python3 scripts/convert.py orbax-to-hf /data/m3-orbax /data/m3-hf --shards 59
"""

from __future__ import annotations

import argparse

from models import cli


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"])
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="parameter dtype (the router always stays float32)")
  parser.add_argument("--mesh", default=None,
                      help="e.g. tensor=4,expert=2 (default: one device)")
  parser.add_argument("--shards", type=int, default=4, help="safetensors files (orbax-to-hf)")
  args = parser.parse_args(argv)
  # JAX and the model load after parsing, so --help and argument errors answer at once.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from models import checkpoint, sharding  # pylint: disable=g-import-not-at-top
  from models import config as config_lib  # pylint: disable=g-import-not-at-top
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
  if args.shards < 1:
    raise SystemExit(f"--shards must be >= 1; got {args.shards}")
  mesh = None
  if args.mesh:
    try:
      mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, {}))
    except ValueError as e:
      raise SystemExit(f"--mesh: {e}")
  try:
    # Refused before anything is read or written: the destination must be new (or empty).
    checkpoint.refuse_nonempty(args.dst)
    if args.direction == "hf-to-orbax":
      if not checkpoint.is_hf_folder(args.src):
        checkpoint.load(args.src)  # raises, saying what the folder lacks
      model = checkpoint.load_hf(args.src, mesh=mesh, dtype=dtype)
      checkpoint.save_orbax(model, args.dst)
    else:
      model = checkpoint.load_orbax(args.src, mesh=mesh, dtype=dtype)
      store = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[args.dtype]
      checkpoint.save_hf(model, args.dst, config_lib.to_hf_config(model.config),
                         num_shards=args.shards, dtype=store)
  except checkpoint.CheckpointError as e:
    raise SystemExit(f"convert.py {args.direction}: {e}")
  print(f"wrote {args.dst}")
  return 0


run = cli.console_command(main)


if __name__ == "__main__":
  run()
