"""scripts/benchmark.py runs end to end (tiny shapes, CPU, interpreted kernels)."""

import json
import os
import subprocess
import sys
from tests import ROOT



def test_benchmark_smoke(tmp_path):
  script = os.path.join(ROOT, "scripts", "benchmark.py")
  help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                             check=True).stdout
  assert "--smoke" in help_text and "--chunk" in help_text
  proc = subprocess.run([sys.executable, script, "--smoke", "--tune", "--sizes", "256",
                         "--decode-queries", "1", "--paged", "--output-dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "smoke.json").read_text())
  rows = {r["selection"]: r for r in result["prefill"]}
  assert set(rows) == {"random", "structured"} and len(result["prefill"]) == 2
  for row in rows.values():
    assert row["N"] == 256 and row["chunks"] == 2  # chunked prefill exercised
    for key in ("index_ms", "sparse_ms", "msa_ms", "dense_ms", "last_chunk_kernel_ms"):
      assert row[key] > 0
    assert 4 <= row["union8"] <= 8 * 4  # topk 4: between full agreement and none
  # neighbours share blocks on structured inputs; the dense baseline is timed once per N
  assert rows["structured"]["union8"] < rows["random"]["union8"]
  assert rows["structured"]["dense_ms"] == rows["random"]["dense_ms"]
  assert len(result["decode"]) == 4  # 2 batch sizes x 2 selections
  assert all(r[key] > 0 for r in result["decode"] for key in ("msa_ms", "index_ms", "sparse_ms"))
  paged = result["paged_decode"]
  assert len(paged) == 2 and all("error" not in r for r in paged), paged
  assert all(r["msa_loop_ms"] > 0 and r["speedup_loop"] > 0 for r in paged)
  assert (tmp_path / "smoke.md").read_text().count("|") > 20
  assert (tmp_path / "smoke.png").stat().st_size > 1000
  assert "| N |" in proc.stdout  # the table is printed last
  tuned = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tuning" / "cpu").iterdir()}
  assert set(tuned) == {"index", "sparse", "index_decode"}
  (sparse,) = tuned["sparse"]["configs"]  # one entry, at the shape it was timed at
  assert sparse["config"]["query_chunk"] in (None, 32)  # the sparse-path sweep
  assert tuned["index"]["device_kind"] == "cpu"
  assert all(e["shape"]["context"] > 0 for e in tuned["index"]["configs"])
  assert all(t["ms"] > 0 for t in result["tuning"]["index"]["trials"])

  # --merge: two invocations' results (say prefill and decode, run as two processes) as one.
  first = dict(result, decode=[])
  second = dict(result, prefill=[], meta=dict(result["meta"], commit="other"))
  for name, part in (("a.json", first), ("b.json", second)):
    (tmp_path / name).write_text(json.dumps(part))
  proc = subprocess.run([sys.executable, script, "--merge", str(tmp_path / "a.json"),
                         str(tmp_path / "b.json"), "--output-dir", str(tmp_path), "--tag", "both"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  merged = json.loads((tmp_path / "both.json").read_text())
  assert merged["prefill"] == result["prefill"] and merged["decode"] == result["decode"]
  assert [p["meta"]["commit"] for p in merged["parts"]] == [result["meta"]["commit"], "other"]
  assert (tmp_path / "both.png").stat().st_size > 1000


def test_benchmark_model_smoke(tmp_path):
  """scripts/benchmark_model.py: prefill (one dense row extrapolated) and decode rows with
  their byte floors, on the tiny model."""
  script = os.path.join(ROOT, "scripts", "benchmark_model.py")
  proc = subprocess.run([sys.executable, script, "--smoke", "--output-dir", str(tmp_path),
                         "--tag", "smoke"], capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "smoke.json").read_text())
  prefill = {(r["attention"], r["N"]): r for r in result["prefill"]}
  assert set(prefill) == {("msa", 96), ("msa", 160), ("dense", 96), ("dense", 160)}
  assert all("error" not in r and r["prefill_s"] > 0 and r["useful_tflop"] > 0
             for r in prefill.values()), prefill
  assert prefill[("dense", 160)]["dense_extrapolated"]
  # MSA's selection makes the MSA model's useful work smaller than dense at 160 > k*Bk tokens.
  assert prefill[("msa", 160)]["useful_tflop"] < prefill[("dense", 160)]["useful_tflop"]
  assert len(result["decode"]) == 2
  for r in result["decode"]:
    assert "error" not in r, r
    assert r["step_ms"] > 0 and r["floor_GB"] > r["floor_weights_GB"] > 0
  assert (tmp_path / "smoke.png").exists()
  assert (tmp_path / "smoke.md").read_text().count("|") > 20
