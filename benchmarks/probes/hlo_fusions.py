"""Print the HLO behind fusion names seen in a profile (``decode_profile.py``'s table).

Run the program with ``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text``, then

    python3 benchmarks/probes/hlo_fusions.py DIR input_scatter_fusion.15 ...

For each name, in every optimized module that defines it: the fusion instruction (its
operands and shapes) and the body of its fused computation. Profile names use ``_`` where
HLO uses ``.`` before the number; both are accepted.
"""

from __future__ import annotations

import glob
import os
import re
import sys


def main():
  if len(sys.argv) < 3:
    print(__doc__)
    sys.exit(2)
  folder, names = sys.argv[1], sys.argv[2:]
  files = sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt")), key=os.path.getsize)
  for name in names:
    name = re.sub(r"_(\d+)$", r".\1", name)
    for path in files:
      text = open(path).read()
      m = re.search(rf"^\s*(ROOT )?%?{re.escape(name)} = .*$", text, re.M)
      if not m:
        continue
      line = m.group(0).strip()
      print(f"== {name} in {os.path.basename(path)}\n{line[:600]}")
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if called:
        body = re.search(rf"^%?{re.escape(called.group(1))} .*?^}}", text, re.M | re.S)
        if body:
          print("\n".join(l[:300] for l in body.group(0).splitlines()[:40]))
      break


if __name__ == "__main__":
  main()
