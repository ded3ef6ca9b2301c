"""The generate command: greedy tokens checked against the model, static and continuous
batching, prompts, sampling flags and errors. Most tests call ``models.cli.generate.main`` in
this process (on one device); a few run ``scripts/generate.py`` end to end (subprocess)."""

import json
import os
import subprocess
import sys
import jax.numpy as jnp
import numpy as np
import pytest

from models import checkpoint
from models.cli import generate
from tests import ROOT, call_main

SCRIPT = os.path.join(ROOT, "scripts", "generate.py")
LONG = ",".join(str(i % 200 + 3) for i in range(45))  # past k*Bk = 32: selection active


def _main(args, stdin: str = ""):
  """``generate.main(args)`` in this process. The test process has several (fake) devices:
  the mesh is pinned to one unless ``args`` name one."""
  if "--mesh" not in args:
    args = [*args, "--mesh", "tensor=1"]
  return call_main(generate.main, args, stdin)


def _run(args, devices=1):
  """A run that must succeed: in this process, or as a subprocess with ``devices`` fake
  devices."""
  if devices == 1:
    proc = _main(args)
  else:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return checkpoint.write_random(str(tmp_path_factory.mktemp("gen") / "tiny"), dtype="float32")


def test_help():
  out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                       check=True).stdout
  for flag in ("--checkpoint", "--prompt-ids", "--mesh", "--output-json", "--top-p"):
    assert flag in out


def test_default_tiny_end_to_end_greedy_matches_model(tmp_path):
  """The script as a user runs it (subprocess, default mesh over its one device)."""
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, SCRIPT, "--prompt-ids", "5,17,42", "--prompt-ids",
                         LONG, "--max-new-tokens", "4", "--output-json", str(out)],
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tok/s" in proc.stdout.splitlines()[-1]
  result = json.loads(out.read_text())
  assert [len(g) for g in result["generated_ids"]] == [4, 4]
  model = checkpoint.load_hf(result["checkpoint"], progress=False)
  for prompt, gen in zip(result["prompt_ids"], result["generated_ids"]):
    seq = jnp.asarray([prompt + gen])
    logits = np.asarray(model.forward(seq))[0]
    want = logits[len(prompt) - 1:-1].argmax(-1)
    assert want.tolist() == gen


def test_sharded_same_tokens_as_unsharded(ckpt, tmp_path):
  args = ["--checkpoint", ckpt, "--prompt-ids", LONG, "--prompt-ids", "9,8,7",
          "--max-new-tokens", "3", "--quiet"]
  _run(args + ["--mesh", "tensor=1", "--output-json", str(tmp_path / "a.json")])
  _run(args + ["--mesh", "data=2,tensor=2,expert=2", "--output-json", str(tmp_path / "b.json")],
       devices=8)
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["generated_ids"] == b["generated_ids"]
  assert b["mesh"] == {"data": 2, "tensor": 2, "expert": 2}


def test_bad_prompt_ids(ckpt):
  proc = _main(["--checkpoint", ckpt, "--prompt-ids", "1,x"])
  assert proc.returncode != 0 and "comma-separated integers" in proc.stderr


def test_continuous_batching_same_tokens_as_static_batch(ckpt, tmp_path):
  """5 requests of different lengths through 2 rows of a paged cache: they are admitted as
  others leave, and each gets exactly the tokens of the plain batched run."""
  prompts = [LONG, "7,8", "9,10,11,12,13", LONG[:40], "1"]
  args = ["--checkpoint", ckpt, "--max-new-tokens", "5", "--quiet"]
  for p in prompts:
    args += ["--prompt-ids", p]
  _run(args + ["--output-json", str(tmp_path / "static.json")])
  _run(args + ["--max-batch", "2", "--output-json", str(tmp_path / "served.json")])
  static = json.loads((tmp_path / "static.json").read_text())
  served = json.loads((tmp_path / "served.json").read_text())
  assert served["generated_ids"] == static["generated_ids"]
  steps = [(r["admitted_step"], r["finished_step"]) for r in served["requests"]]
  assert max(a for a, _ in steps) > 0  # later requests waited for a free row
  rows = [r["row"] for r in served["requests"]]
  assert set(rows) == {0, 1}
  # Prompts prefilled in chunks of one block (LONG takes 3 chunks, while the other row
  # waits), decode one step per call: the same tokens.
  _run(args + ["--max-batch", "2", "--decode-block", "1", "--prefill-chunk", "16",
               "--output-json", str(tmp_path / "chunked.json")])
  chunked = json.loads((tmp_path / "chunked.json").read_text())
  assert chunked["generated_ids"] == static["generated_ids"]
  assert chunked["includes_compilation"] is False
  assert chunked["steps"] > served["steps"]  # the chunks are steps of their own
  proc = _main(args + ["--max-batch", "2", "--prefill-chunk", "24"])
  assert proc.returncode != 0 and "multiple of the block size 16" in proc.stderr


def test_continuous_batching_waits_for_pages_and_refuses_what_never_fits(ckpt, tmp_path):
  """Few pages: a request waits until another leaves; one larger than the cache is refused
  with a message while the rest are served correctly."""
  long_prompt = ",".join("5" for _ in range(200))  # 200 + 4 tokens: 13 pages of 16
  prompts = [LONG, "7,8,9", long_prompt, "4,4,4,4"]
  args = ["--checkpoint", ckpt, "--max-new-tokens", "4", "--quiet"]
  for p in prompts:
    args += ["--prompt-ids", p]
  proc = _run(args + ["--max-batch", "3", "--num-pages", "4",
                      "--output-json", str(tmp_path / "served.json")])
  served = json.loads((tmp_path / "served.json").read_text())
  assert "request 2 refused" in proc.stderr and "refused" in served["requests"][2]
  assert served["generated_ids"][2] == []
  solo = []
  for p in (LONG, "7,8,9", "4,4,4,4"):
    _run(["--checkpoint", ckpt, "--max-new-tokens", "4", "--quiet", "--prompt-ids", p,
          "--output-json", str(tmp_path / "solo.json")])
    solo.append(json.loads((tmp_path / "solo.json").read_text())["generated_ids"][0])
  assert [served["generated_ids"][i] for i in (0, 1, 3)] == solo
  # LONG (45 + 4 tokens) takes 4 pages of 16: the others had to wait for it to leave.
  assert served["requests"][1]["admitted_step"] >= served["requests"][0]["finished_step"]


def test_prompts_from_files_and_stdin(ckpt, tmp_path):
  """--prompt-ids-file (commas or whitespace), --prompt-file (text) and stdin ('-'), in the
  order given; a 3,000-token prompt that would be unwieldy on the command line."""
  long_ids = [(7 * i) % 250 + 3 for i in range(3000)]
  ids_file = tmp_path / "ids.txt"
  ids_file.write_text("\n".join(" ".join(map(str, long_ids[i:i + 100]))
                                for i in range(0, 3000, 100)))
  text_file = tmp_path / "prompt.txt"
  text_file.write_text("hello\nworld")
  out = tmp_path / "out.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--checkpoint", ckpt, "--prompt-ids-file", str(ids_file),
       "--prompt-file", str(text_file), "--prompt-ids-file", "-", "--max-new-tokens", "2",
       "--prefill-chunk", "1024", "--quiet", "--output-json", str(out)],
      input="9, 8,7\n", capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["prompt_ids"][0] == long_ids
  assert result["prompt_ids"][1] == list(b"hello\nworld")  # byte tokenizer: no tokenizer.json
  assert result["prompt_ids"][2] == [9, 8, 7]
  assert [len(g) for g in result["generated_ids"]] == [2, 2, 2]
  assert result["prefill_chunk"] == 1024 and "compile_s" in result


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids-file", "/nonexistent/ids.txt"], "/nonexistent/ids.txt: cannot read"),
    (["--prompt-ids-file", "-", "--prompt-file", "-"], "standard input can be read only once"),
])
def test_bad_prompt_files(ckpt, args, message):
  proc = _main(["--checkpoint", ckpt, *args], stdin="1 2")
  assert proc.returncode != 0 and message in proc.stderr


def test_random_weights_without_files(tmp_path):
  out = tmp_path / "out.json"
  proc = _run(["--random-weights", "tiny", "--prompt-ids", "5,17,42", "--max-new-tokens", "3",
               "--quiet", "--output-json", str(out)])
  result = json.loads(out.read_text())
  assert result["checkpoint"] == "random:tiny" and len(result["generated_ids"][0]) == 3
  assert "peak memory" in proc.stdout.splitlines()[-1]


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "-1"], "temperature must be a finite number"),
    (["--top-p", "-0.5"], "top_p must lie in [0, 1]"),
    (["--top-p", "1.5"], "top_p must lie in [0, 1]"),
    (["--mesh", "tensor=0"], "axis sizes must be >= 1"),
    (["--mesh", "data=16"], "needs 16 devices"),
    (["--checkpoint", __file__], "is a file"),
    (["--checkpoint", "/nonexistent/folder"], "does not exist"),
    (["--chat"], "has no chat template"),
    (["--system", "be brief"], "--system needs --chat"),
])
def test_bad_arguments_exit_with_a_message(ckpt, args, message):
  if "--checkpoint" not in args:
    args = ["--checkpoint", ckpt] + args
  proc = _main([*args, "--prompt-ids", "1,2"])
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_prompt_past_max_position_embeddings_is_refused(tmp_path):
  config = json.loads(open(os.path.join(ROOT, "models", "configs", "tiny.json")).read())
  config["max_position_embeddings"] = 32
  path = tmp_path / "short.json"
  path.write_text(json.dumps(config))
  proc = _main(["--random-weights", str(path), "--prompt-ids", ",".join(["5"] * 30),
                "--max-new-tokens", "4"])
  assert proc.returncode != 0 and "max_position_embeddings (32" in proc.stderr


def test_sampling_edges_and_stop_id_on_the_static_path(ckpt, tmp_path):
  """--top-p 0 keeps the most likely token (= greedy at any temperature); --stop-id ends a
  row in the static path; --max-new-tokens 0 generates nothing on both paths."""
  base = ["--checkpoint", ckpt, "--prompt-ids", LONG, "--quiet"]
  greedy = tmp_path / "greedy.json"
  _run(base + ["--max-new-tokens", "5", "--output-json", str(greedy)])
  want = json.loads(greedy.read_text())["generated_ids"][0]
  top0 = tmp_path / "top0.json"
  _run(base + ["--max-new-tokens", "5", "--temperature", "1.5", "--top-p", "0",
               "--output-json", str(top0)])
  assert json.loads(top0.read_text())["generated_ids"][0] == want
  stop = tmp_path / "stop.json"
  _run(base + ["--max-new-tokens", "5", "--stop-id", str(want[1]), "--decode-block", "2",
               "--output-json", str(stop)])
  assert json.loads(stop.read_text())["generated_ids"][0] == want[:want.index(want[1]) + 1]
  for extra in ([], ["--max-batch", "1"]):
    none = tmp_path / "none.json"
    _run(base + ["--max-new-tokens", "0", "--output-json", str(none)] + extra)
    assert json.loads(none.read_text())["generated_ids"] == [[]]


def test_every_request_refused_exits_nonzero(ckpt):
  proc = _main(["--checkpoint", ckpt, "--prompt-ids", LONG, "--max-batch", "1",
                "--num-pages", "1", "--quiet"])
  assert proc.returncode != 0
  assert "request 0 refused" in proc.stderr and "no request could be served" in proc.stderr
  assert "served 0 requests (1 refused)" in proc.stdout


def test_eos_from_generation_config_stops_both_paths(ckpt, tmp_path):
  """The checkpoint's generation_config.json eos_token_id ends a request (static and served
  paths); --ignore-eos and an explicit --stop-id override it."""
  import shutil
  folder = tmp_path / "with_eos"
  shutil.copytree(ckpt, folder)
  base = ["--prompt-ids", LONG, "--max-new-tokens", "6", "--quiet"]
  free = tmp_path / "free.json"
  _run(["--checkpoint", ckpt, *base, "--output-json", str(free)])
  tokens = json.loads(free.read_text())["generated_ids"][0]
  eos = tokens[2]
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [99999, eos]}))
  for extra in ([], ["--max-batch", "1"]):
    out = tmp_path / "eos.json"
    _run(["--checkpoint", str(folder), *base, *extra, "--output-json", str(out)])
    got = json.loads(out.read_text())["generated_ids"][0]
    assert got == tokens[:tokens.index(eos) + 1], extra
  out = tmp_path / "ignored.json"
  _run(["--checkpoint", str(folder), *base, "--ignore-eos", "--output-json", str(out)])
  assert json.loads(out.read_text())["generated_ids"][0] == tokens


CHAT = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[sys]{{ m.content }}"
        "{% continue %}{% endif %}<{{ m.role }}>{{ m.content | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chat_folder(ckpt, tmp_path, config):
  import shutil
  folder = tmp_path / "chat"
  shutil.copytree(ckpt, folder)
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


def test_chat_prompts_go_through_the_template(ckpt, tmp_path):
  """--chat: each text prompt is a user message of the checkpoint's chat template (after
  --system), and the model reads the rendered text; ids are refused with --chat."""
  folder = _chat_folder(ckpt, tmp_path, {"chat_template": CHAT, "bos_token": "^"})
  out = tmp_path / "chat.json"
  proc = _run(["--checkpoint", str(folder), "--chat", "--system", "be brief", "--prompt", "hi",
               "--max-new-tokens", "2", "--quiet", "--output-json", str(out)])
  rendered = '^[sys]be brief<user>"hi"\n<assistant>'
  assert json.loads(out.read_text())["prompt_ids"] == [list(rendered.encode())]
  assert f"prompt 0: {rendered!r}" in proc.stdout
  bad = _main(["--checkpoint", str(folder), "--chat", "--prompt-ids", "1,2"])
  assert bad.returncode != 0 and "not to ids" in bad.stderr, bad.stderr[-2000:]


def test_chat_template_sources_and_errors(tmp_path):
  from models import data
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default",
                                                                 "template": CHAT}],
      "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
  template = data.chat_template(str(tmp_path))
  assert template == CHAT
  messages = [{"role": "user", "content": "a\"b"}, {"role": "assistant", "content": "c"}]
  assert data.render_chat(template, messages, folder=str(tmp_path)) == (
      '<s><user>"a\\"b"\n<assistant>"c"\n<assistant>')
  assert data.render_chat(template, messages, folder=str(tmp_path),
                          add_generation_prompt=False).endswith('"c"\n')
  (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no tools') }}")
  with pytest.raises(ValueError, match="chat template: no tools"):
    data.render_chat(data.chat_template(str(tmp_path)), messages)
  with pytest.raises(ValueError, match="chat template"):
    data.render_chat("{% for %}", messages)
  assert data.chat_template(str(tmp_path / "nowhere")) is None
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
    data.chat_template(str(broken))


def test_chat_template_renders_as_transformers_does(tmp_path):
  """The same text as transformers' apply_chat_template (parity extra; skipped without)."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models as tok_models
  Tokenizer(tok_models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>")).save(
      str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": CHAT, "bos_token": "<s>", "unk_token": "<unk>",
      "tokenizer_class": "PreTrainedTokenizerFast"}))
  from models import data
  messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q \u00e9"}]
  want = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  got = data.render_chat(data.chat_template(str(tmp_path)), messages, folder=str(tmp_path))
  assert got == want


def test_mxfp8_resident_weights_give_the_same_tokens(tmp_path):
  """--weights mxfp8 keeps an MXFP8 checkpoint's experts 8-bit on the device (static and
  continuous batching): the tokens of the dequantised model."""
  folder = checkpoint.write_random(str(tmp_path / "mx"), mxfp8=True, dtype="float32")
  base = ["--checkpoint", folder, "--prompt-ids", LONG, "--prompt-ids", "9,8,7",
          "--max-new-tokens", "4", "--quiet"]
  runs = {}
  for name, extra in (("dense", []), ("mxfp8", ["--weights", "mxfp8"]),
                      ("served", ["--weights", "mxfp8", "--max-batch", "2"])):
    out = tmp_path / f"{name}.json"
    _run(base + extra + ["--output-json", str(out)])
    runs[name] = json.loads(out.read_text())
  assert runs["mxfp8"]["weights"] == "mxfp8"
  assert runs["mxfp8"]["generated_ids"] == runs["dense"]["generated_ids"]
  assert runs["served"]["generated_ids"] == runs["dense"]["generated_ids"]
