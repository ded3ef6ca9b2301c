"""Probe: does a model learn content-based induction (lookup by token, not by position)?

Runs ``scripts/finetune.py`` with the retrieval task's examples replaced by random tokens in
which ``--num-pairs`` segments of ``SEGMENT`` tokens are copied from random earlier places;
the scored targets are the copies' tokens after their first one (predictable only by finding
the earlier occurrence of the current token and copying what followed it). Chance is
~1/vocab; a working one-token induction head scores well above it (tokens can repeat, so
some targets are ambiguous). Every other flag is finetune.py's (``--num-queries`` unused).

Why it exists (benchmarks/NOTES.md, third session): the small retrieval models of issue 5's
demonstration stalled on heuristics, while a fixed-offset copy task trained at once.

Usage: python3 benchmarks/probes/induction_probe.py --output-dir /tmp/probe --seq-len 256 \\
    --num-pairs 4 --num-layers 2 --hidden-size 128 --attention dense --kl-weight 0 \\
    --sparse-layers none --moe-layers none --vocab-size 256 --steps 2000 --eval-every 250
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from models import data  # noqa: E402

SEGMENT = 8


def example(self, index, split="train"):
  rng = np.random.default_rng([self.seed, data._split_id(split), int(index)])
  n = self.seq_len + 1
  tokens = rng.integers(self.FIRST, self.vocab_size, size=n)
  targets = []
  for _ in range(self.num_pairs):
    dst = int(rng.integers(n // 2, n - SEGMENT))
    src = int(rng.integers(0, dst - SEGMENT))
    tokens[dst:dst + SEGMENT] = tokens[src:src + SEGMENT]
    targets += range(dst, dst + SEGMENT - 1)  # target index t predicts tokens[t + 1]
  pos = np.unique(np.asarray(targets))
  return tokens.astype(np.int32), pos, tokens[pos + 1].astype(np.int32)


if __name__ == "__main__":
  data.RetrievalTask.example = example
  import finetune  # noqa: E402  (scripts/finetune.py)
  sys.exit(finetune.main(sys.argv[1:]))
