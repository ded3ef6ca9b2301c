"""Training and evaluation data: a synthetic long-context retrieval task and packed text.

Every source is *stateless*: ``batch(start, size, split)`` returns examples
``start .. start+size-1`` of a split as a pure function of the source's settings and seed, so
a training run's data position is just the number of examples it has consumed (resuming from
a checkpoint at step s reads examples ``s*batch ..`` and continues exactly).

A batch is a dict of NumPy arrays: ``inputs`` int32 [B, T], ``targets`` int32 [B, T]
(``inputs`` shifted left by one) and ``loss_mask`` float32 [B, T] (1 = a token the loss and
the metrics count).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

SPLITS = {"train": 0, "eval": 1}


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}; got {split!r}")
  return SPLITS[split]


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
  """Fallback when there is no tokenizer.json: one token per UTF-8 byte (vocab 256)."""

  vocab_size = 256

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens  # no special tokens
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer
    self.tok = Tokenizer.from_file(path)
    self.vocab_size = self.tok.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of ``text``; ``add_special_tokens=False`` for text that holds them already (a
    rendered chat template)."""
    return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids) -> str:
    return self.tok.decode(list(ids))


def load_tokenizer(path: str | None):
  """``path``: a tokenizer.json, a folder holding one, or None; bytes when there is none."""
  if path and os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  return HFTokenizer(path) if path and os.path.exists(path) else ByteTokenizer()


# ----------------------------------------------------------------------------- chat templates


def chat_template(folder: str) -> str | None:
  """The checkpoint's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of named templates: the one named ``default``), else
  None."""
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = _tokenizer_config(folder).get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise ValueError(f"{folder}/tokenizer_config.json: chat_template must be a string or a "
                     f"list of {{name, template}}; got {type(template).__name__}")
  return template


def _tokenizer_config(folder: str) -> dict:
  path = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str:
  """A special token of tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content", "")
  return value or ""


def render_chat(template: str, messages: Sequence[dict], *, folder: str | None = None,
                add_generation_prompt: bool = True) -> str:
  """``messages`` (``{"role", "content"}`` dicts) through a Hugging Face chat template, as
  ``transformers``' ``apply_chat_template(tokenize=False)`` renders it: a sandboxed Jinja
  environment with ``trim_blocks``/``lstrip_blocks``, the loop controls, ``raise_exception``,
  ``strftime_now`` and a ``tojson`` filter; ``bos_token``/``eos_token`` and the other special
  tokens from ``folder``'s tokenizer_config.json."""
  import datetime  # pylint: disable=g-import-not-at-top
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  config = _tokenizer_config(folder) if folder else {}
  special = {k: _token_text(v) for k, v in config.items()
             if k.endswith("_token") and isinstance(v, (str, dict))}
  try:
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template: {e}") from None


# ----------------------------------------------------------------------------- retrieval task


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
  """Key -> value pairs hidden in random filler; the model must recall queried values.

  An example is ``seq_len + 1`` tokens: filler tokens with ``num_pairs`` triples
  ``[PAIR, key, value]`` at random non-overlapping places, then ``num_queries`` triples
  ``[QUERY, key, value]`` for distinct stored keys at the very end. The loss mask selects the
  targets that are queried values (the model sees ``QUERY key`` and must output the value
  stored with that key, possibly thousands of tokens earlier). Keys are distinct within an
  example. Vocabulary: 0 unused, 1 PAIR, 2 QUERY, 3 reserved, then keys, values, filler
  (keys and values get a quarter of the rest each).

  ``repeats > 1`` (a training aid): each pair is stored that many times at random places, and
  the values of all but its first occurrence are scored targets too. The same content-based
  lookup then has ``num_pairs * (repeats - 1)`` extra targets per example at every distance,
  a denser signal than the queries alone (not shown to speed learning up: notes in
  benchmarks/NOTES.md). Evaluate with ``repeats=1``.

  ``fused=True`` stores each pair as *one* token that names both its key and its value
  (``FUSED_VALUES`` values, so ``num_keys * FUSED_VALUES`` pair tokens), hidden in the filler
  at random places; the query tail is unchanged. Finding the pair is then a single attention
  lookup by content (the query's key against the pair tokens), with no previous-token circuit
  to compose first: the two-token format needs an induction circuit, which small models form
  only after a long plateau (benchmarks/NOTES.md: a minimal 2-layer
  transformer stays at chance on content-based copying for 3,000 steps). The retrieval
  itself, one needle per queried key anywhere in the context, is the same.
  """

  vocab_size: int
  seq_len: int
  num_pairs: int = 8
  num_queries: int = 1
  seed: int = 0
  repeats: int = 1
  fused: bool = False

  PAIR = 1
  QUERY = 2
  FIRST = 4
  FUSED_VALUES = 16

  def __post_init__(self):
    if self.num_pairs < 1 or not 1 <= self.num_queries <= self.num_pairs:
      raise ValueError(f"need num_pairs >= 1 and 1 <= num_queries <= num_pairs; got "
                       f"{self.num_pairs}, {self.num_queries}")
    if self.repeats < 1 or (self.fused and self.repeats != 1):
      raise ValueError(f"need repeats >= 1 (exactly 1 with fused pairs); got {self.repeats}")
    if self.num_keys < self.num_pairs or self.filler_size < 1:
      raise ValueError(f"vocab_size {self.vocab_size} is too small for {self.num_pairs} "
                       f"distinct keys (has {self.num_keys}) plus values and filler")
    if self.fused and self.context_len < self.num_pairs:
      raise ValueError(f"seq_len {self.seq_len} is too short for {self.num_pairs} pairs "
                       f"and {self.num_queries} queries")
    if not self.fused and self.context_len // 3 < self.num_pairs * self.repeats:
      raise ValueError(f"seq_len {self.seq_len} is too short for {self.num_pairs} pairs "
                       f"x {self.repeats} and {self.num_queries} queries (3 tokens each)")

  @property
  def num_keys(self) -> int:
    if self.fused:  # keys, values and pair tokens within 3/4 of the vocabulary
      return ((self.vocab_size - self.FIRST) * 3 // 4 - self.FUSED_VALUES) // (
          self.FUSED_VALUES + 1)
    return (self.vocab_size - self.FIRST) // 4

  @property
  def num_values(self) -> int:
    return self.FUSED_VALUES if self.fused else self.num_keys

  @property
  def num_pair_tokens(self) -> int:
    return self.num_keys * self.num_values if self.fused else 0

  @property
  def filler_size(self) -> int:
    return (self.vocab_size - self.FIRST - self.num_keys - self.num_values
            - self.num_pair_tokens)

  def pair_token(self, key, value):
    """fused: the token that stores ``key -> value`` (token ids of the key and the value)."""
    base = self.FIRST + self.num_keys + self.num_values
    return base + (key - self.FIRST) * self.num_values + (value - self.FIRST - self.num_keys)

  @property
  def context_len(self) -> int:
    """Tokens before the query tail (where the pairs hide)."""
    return self.seq_len + 1 - 3 * self.num_queries

  def example(self, index: int, split: str = "train"):
    """One example: (tokens int32 [seq_len+1], answer positions in targets, values)."""
    rng = np.random.default_rng([self.seed, _split_id(split), int(index)])
    key0, value0 = self.FIRST, self.FIRST + self.num_keys
    filler0 = value0 + self.num_values + self.num_pair_tokens
    tokens = rng.integers(filler0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)
    if self.fused:
      keys = key0 + rng.choice(self.num_keys, self.num_pairs, replace=False)
      values = value0 + rng.integers(0, self.num_values, size=self.num_pairs)
      places = rng.choice(self.context_len, self.num_pairs, replace=False)
      tokens[places] = self.pair_token(keys, values)
      return self._with_queries(tokens, keys, values, rng)
    slots = rng.choice(self.context_len // 3, self.num_pairs * self.repeats, replace=False)
    keys = key0 + rng.choice(self.num_keys, self.num_pairs, replace=False)
    values = value0 + rng.integers(0, self.num_values, size=self.num_pairs)
    pair_of = np.arange(self.num_pairs)  # pair stored at each slot
    if self.repeats > 1:
      pair_of = rng.permutation(np.repeat(pair_of, self.repeats))
    for s, i in zip(slots, pair_of):
      tokens[3 * s:3 * s + 3] = (self.PAIR, keys[i], values[i])
    tokens, answer_pos, answers = self._with_queries(tokens, keys, values, rng)
    if self.repeats > 1:  # every later occurrence of a pair: its value is known by then
      order = np.argsort(slots)
      seen, later = set(), []
      for s, i in zip(slots[order], pair_of[order]):
        if i in seen:
          later.append((3 * s + 1, values[i]))
        seen.add(i)
      answer_pos = np.concatenate([[p for p, _ in later], answer_pos]).astype(np.int64)
      answers = np.concatenate([[v for _, v in later], answers]).astype(np.int32)
    return tokens, answer_pos, answers

  def _with_queries(self, tokens, keys, values, rng):
    """The query tail [QUERY, key, value] x num_queries for distinct stored keys."""
    asked = rng.choice(self.num_pairs, self.num_queries, replace=False)
    tail = np.stack([np.full(self.num_queries, self.QUERY), keys[asked], values[asked]], 1)
    tokens[self.context_len:] = tail.reshape(-1)
    # The value of query j sits at context_len + 3j + 2; its target index is one less.
    answer_pos = self.context_len + 3 * np.arange(self.num_queries) + 1
    return tokens.astype(np.int32), answer_pos, values[asked].astype(np.int32)

  def batch(self, start: int, size: int, split: str = "train") -> dict:
    inputs = np.zeros((size, self.seq_len), np.int32)
    targets = np.zeros((size, self.seq_len), np.int32)
    mask = np.zeros((size, self.seq_len), np.float32)
    for i in range(size):
      tokens, answer_pos, _ = self.example(start + i, split)
      inputs[i], targets[i] = tokens[:-1], tokens[1:]
      mask[i, answer_pos] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": mask}

  def describe(self) -> dict:
    return {"kind": "retrieval", **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------- packed text


def read_documents(paths: Sequence[str], text_field: str = "text") -> list[str]:
  """Documents from .txt files (one per file) and .jsonl files (``text_field`` per line)."""
  docs = []
  for path in paths:
    if path.endswith(".jsonl"):
      with open(path) as f:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          record = json.loads(line)
          if text_field not in record:
            raise ValueError(f"{path}:{n}: no field {text_field!r} (use --text-field)")
          docs.append(str(record[text_field]))
    elif path.endswith(".txt"):
      with open(path, encoding="utf-8") as f:
        docs.append(f.read())
    else:
      raise ValueError(f"{path}: expected a .txt or .jsonl file")
  return docs


class TextDataset:
  """Tokenised documents packed into one stream and cut into ``seq_len + 1``-token windows.

  Window i is ``stream[i*T : i*T + T + 1]`` (T = seq_len; neighbours share one token). The last
  ``eval_fraction`` of the windows is the held-out eval split. Training visits the train
  windows in a fresh permutation per epoch (seeded by (seed, epoch)); eval reads in order.
  ``eos_id`` (optional) is appended after every document.
  """

  def __init__(self, paths: Sequence[str], tokenizer, seq_len: int, *, text_field="text",
               eos_id: int | None = None, eval_fraction: float = 0.05, seed: int = 0,
               vocab_size: int | None = None):
    ids = []
    for doc in read_documents(paths, text_field):
      ids.extend(tokenizer.encode(doc))
      if eos_id is not None:
        ids.append(eos_id)
    self.stream = np.asarray(ids, np.int32)
    if vocab_size is not None and self.stream.size and self.stream.max() >= vocab_size:
      raise ValueError(f"token id {self.stream.max()} is outside the model's vocabulary "
                       f"({vocab_size}): wrong tokenizer for this model?")
    self.seq_len, self.seed, self.paths = seq_len, seed, list(paths)
    windows = (self.stream.size - 1) // seq_len
    if windows < 1:
      raise ValueError(f"{self.stream.size} tokens are not enough for one window of "
                       f"{seq_len + 1}")
    n_eval = int(round(windows * eval_fraction)) if windows > 1 else 0
    n_eval = min(max(n_eval, 1 if eval_fraction > 0 and windows > 1 else 0), windows - 1)
    self.num_train, self.num_eval = windows - n_eval, n_eval
    self._perm_cache: dict[int, np.ndarray] = {}

  def _window(self, i: int) -> np.ndarray:
    return self.stream[i * self.seq_len:i * self.seq_len + self.seq_len + 1]

  def _train_window(self, index: int) -> int:
    epoch, pos = divmod(index, self.num_train)
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
          self.num_train)}
    return int(self._perm_cache[epoch][pos])

  def batch(self, start: int, size: int, split: str = "train") -> dict:
    _split_id(split)
    if split == "eval" and not self.num_eval:
      raise ValueError("no eval split: the text is one window long or eval_fraction is 0")
    rows = []
    for i in range(start, start + size):
      w = self._train_window(i) if split == "train" else self.num_train + i % self.num_eval
      rows.append(self._window(w))
    tokens = np.stack(rows)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((size, self.seq_len), np.float32)}

  def describe(self) -> dict:
    return {"kind": "text", "paths": self.paths, "seq_len": self.seq_len, "seed": self.seed,
            "tokens": int(self.stream.size), "train_windows": self.num_train,
            "eval_windows": self.num_eval}
