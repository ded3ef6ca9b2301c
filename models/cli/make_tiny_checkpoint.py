"""Write a small random MiniMax-M3-family model in the exact released Hugging Face layout.

Nested ``config.json`` (``text_config`` + ``sparse_attention_config``), sharded
``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, tensor names with
the ``language_model.`` prefix, optionally MXFP8 like MiniMax-M3-MXFP8. The default for demos
and tests (``scripts/generate.py`` makes one on the fly when no checkpoint is given).

Example:  python3 scripts/make_tiny_checkpoint.py --output-dir /tmp/tiny-m3 --mxfp8
"""

from __future__ import annotations

import argparse

from models import cli


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument("--output-dir", required=True, help="folder to write")
  parser.add_argument("--config", default="tiny",
                      help="a preset name (tiny, msa_109b, minimax_m3) or a config.json path")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
  parser.add_argument("--mxfp8", action="store_true", help="store Linear weights as MXFP8")
  parser.add_argument("--shards", type=int, default=2, help="number of safetensors files")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="storage dtype of unquantised weights (router stays float32)")
  args = parser.parse_args(argv)
  from models import checkpoint  # pylint: disable=g-import-not-at-top  (JAX: after parsing)
  checkpoint.write_random(args.output_dir, config=args.config, seed=args.seed, mxfp8=args.mxfp8,
                          num_shards=args.shards, dtype=args.dtype)
  print(f"wrote {args.output_dir}")
  return 0


run = cli.console_command(main)


if __name__ == "__main__":
  run()
