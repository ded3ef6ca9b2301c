"""Evaluation of a MiniMax-M3-family checkpoint: retrieval accuracy, perplexity and indexer
recall, for one or more attention variants on the same held-out examples.

``evaluate_checkpoint`` is what ``scripts/evaluate.py`` runs; ``data_source`` builds the data
the evaluation (and fine-tuning) reads. The metrics themselves are ``models.metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from models import data as data_lib

VARIANTS = ("dense", "msa", "msa-random-indexer")
DTYPES = ("bfloat16", "float32")


def data_source(vocab_size: int, *, task: str = "retrieval", seq_len: int = 256,
                num_pairs: int = 8, num_queries: int = 1, repeats: int = 1,
                fused_pairs: bool = False, text_files: Sequence[str] = (),
                text_field: str = "text", tokenizer: str | None = None,
                eos_id: int | None = None, eval_fraction: float = 0.05, data_seed: int = 0,
                tokenizer_dirs: Sequence[str] = ()):
  """The synthetic retrieval task or a tokenised text dataset (``models.data``). Text is
  tokenised with ``tokenizer`` (a tokenizer.json or a folder with one), else the first of
  ``tokenizer_dirs`` that has one, else UTF-8 bytes. ``ValueError``/``OSError`` on bad
  settings or files."""
  if task == "retrieval":
    return data_lib.RetrievalTask(vocab_size, seq_len, num_pairs=num_pairs,
                                  num_queries=num_queries, seed=data_seed, repeats=repeats,
                                  fused=fused_pairs)
  if task != "text":
    raise ValueError(f"task must be 'retrieval' or 'text'; got {task!r}")
  if not text_files:
    raise ValueError("the text task needs text files")
  path = tokenizer
  for folder in tokenizer_dirs:
    if path is None and folder and os.path.exists(os.path.join(folder, "tokenizer.json")):
      path = os.path.join(folder, "tokenizer.json")
  return data_lib.TextDataset(list(text_files), data_lib.load_tokenizer(path), seq_len,
                              text_field=text_field, eos_id=eos_id,
                              eval_fraction=eval_fraction, seed=data_seed,
                              vocab_size=vocab_size)


def evaluate_checkpoint(checkpoint: str, source_fn, *,
                        variants: Sequence[str] = ("dense", "msa"), num_examples: int = 64,
                        batch_size: int = 8,
                        block_size: int | None = None, topk: int | None = None,
                        index_score_dtype: str | None = None, indexer_metrics: bool = True,
                        indexer_seed: int = 1234, dtype: str | None = None, mesh=None,
                        implementation: str | None = None,
                        dense_implementation: str | None = None, progress: bool = True) -> dict:
  """Evaluate ``checkpoint`` (a fine-tuning run folder, an Orbax model folder or a Hugging
  Face folder) under each of ``variants`` (``VARIANTS``) on the same examples of
  ``source_fn(vocab_size)``. ``block_size``/``topk``/``index_score_dtype`` override the
  checkpoint's selection. Returns {"checkpoint", "data", "block_size", "topk",
  "index_score_dtype", "variants": {variant: models.metrics.evaluate's result}}.
  ``ValueError`` for a checkpoint that cannot be read or variants it cannot run."""
  import jax
  import jax.numpy as jnp
  from models import metrics, sharding, training

  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
  variants = list(dict.fromkeys(variants))  # in order, once each
  dtype = jnp.dtype(dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
  if mesh is None:
    mesh = sharding.make_mesh(sharding.parse_mesh(None, {"data": jax.device_count()}))
  try:
    config, params = training.load_params(checkpoint)
  except (ValueError, OSError) as e:
    raise ValueError(f"checkpoint {checkpoint}: {e}") from e
  config = training.override_config(config, index_block_size=block_size,
                                    index_topk_blocks=topk, index_score_dtype=index_score_dtype)
  if any(v != "dense" for v in variants) and not any(config.sparse_layers):
    raise ValueError("the model has no MSA layers: only the dense variant applies")
  model, _ = training.build_model(config, dtype=dtype, param_dtype=dtype,
                                  implementation=implementation, init_params=params)
  parts = training.ModelParts(model)
  params = parts.params(model)
  source = source_fn(config.vocab_size)
  results = {"checkpoint": os.path.abspath(checkpoint), "data": source.describe(),
             "block_size": config.index_block_size, "topk": config.index_topk_blocks,
             "index_score_dtype": config.index_score_dtype, "variants": {}}
  for variant in variants:
    p = (training.randomize_index_params(params, config, indexer_seed)
         if variant == "msa-random-indexer" else params)
    results["variants"][variant] = metrics.evaluate(
        parts, p, source, num_examples=num_examples, batch_size=batch_size,
        attention="dense" if variant == "dense" else "msa", indexer=indexer_metrics, mesh=mesh,
        dense_implementation=dense_implementation, progress=progress)
  return results
