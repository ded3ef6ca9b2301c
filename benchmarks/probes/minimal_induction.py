"""A minimal standard transformer on the content-based induction probe (no repository code).

The same data as ``induction_probe.py`` (random tokens; 4 segments of 8 tokens copied from
random earlier places; the copies' tokens after their first are scored) on a from-scratch
2-layer attention-only transformer (d128, 4 heads of 32, pre-RMSNorm, RoPE), to tell whether
a failure to learn is our model's or the task's. Flags switch on the MiniMax-M3 ingredients:
per-head QK RMSNorm (``--qknorm 1``), RoPE theta 5e6 with partial rotary (``--theta 5e6 --rot
16``), an MLP (``--mlp 1``). Prints loss and accuracy on the scored tokens every 500 steps.

Fourth session, H200: every variant stayed at chance (0.7-1.6%) for 3,000 steps
(benchmarks/NOTES.md).

Usage: python3 benchmarks/probes/minimal_induction.py --steps 3000 [--qknorm 1] ...
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, WIDTH, HEADS, HEAD_DIM, BATCH, SEGMENT, SEGMENTS = 256, 128, 4, 32, 32, 8, 4


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--theta", type=float, default=1e4, help="RoPE base (M3: 5e6)")
  p.add_argument("--rot", type=int, default=32, help="rotary dims of the 32 (M3: half)")
  p.add_argument("--qknorm", type=int, default=0, help="1: per-head QK RMSNorm (as M3)")
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--mlp", type=int, default=0, help="1: a GELU MLP after each attention")
  p.add_argument("--T", type=int, default=256, help="tokens per example")
  return p.parse_args(argv)


def example(rng, t):
  """(inputs, targets, mask): random tokens with SEGMENTS copied segments, copies scored."""
  n = t + 1
  tokens = rng.integers(4, VOCAB, size=n)
  scored = []
  for _ in range(SEGMENTS):
    dst = int(rng.integers(n // 2, n - SEGMENT))
    src = int(rng.integers(0, dst - SEGMENT))
    tokens[dst:dst + SEGMENT] = tokens[src:src + SEGMENT]
    scored += range(dst, dst + SEGMENT - 1)  # target index i predicts tokens[i + 1]
  mask = np.zeros(t, np.float32)
  mask[np.unique(scored)] = 1
  return tokens[:-1], tokens[1:], mask


def batch(step, t):
  rng = np.random.default_rng(step)
  return tuple(np.stack(z) for z in zip(*[example(rng, t) for _ in range(BATCH)]))


def init(key, args):
  keys = iter(jax.random.split(key, 100))
  normal = lambda *shape: jax.random.normal(next(keys), shape) * 0.02
  inner = HEADS * HEAD_DIM
  params = {"emb": normal(VOCAB, WIDTH), "out": normal(WIDTH, VOCAB), "lnf": jnp.ones(WIDTH),
            "layers": []}
  for _ in range(args.layers):
    layer = {"wq": normal(WIDTH, inner), "wk": normal(WIDTH, inner), "wv": normal(WIDTH, inner),
             "wo": normal(inner, WIDTH), "qn": jnp.ones(HEAD_DIM), "kn": jnp.ones(HEAD_DIM),
             "ln1": jnp.ones(WIDTH), "ln2": jnp.ones(WIDTH)}
    if args.mlp:
      layer |= {"w1": normal(WIDTH, 4 * WIDTH), "w2": normal(4 * WIDTH, WIDTH)}
    params["layers"].append(layer)
  return params


def rms(x, w):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w


def rope(x, args):
  r = args.rot
  angle = jnp.arange(x.shape[1])[:, None] * args.theta ** (-jnp.arange(0, r, 2) / r)
  cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
  x1, x2 = x[..., :r // 2], x[..., r // 2:r]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], -1)


def forward(params, x, args):
  b, t = x.shape
  h = params["emb"][x]
  causal = jnp.tril(jnp.ones((t, t), bool))
  for layer in params["layers"]:
    y = rms(h, layer["ln1"])
    q, k, v = ((y @ layer[w]).reshape(b, t, HEADS, HEAD_DIM) for w in ("wq", "wk", "wv"))
    if args.qknorm:
      q, k = rms(q, layer["qn"]), rms(k, layer["kn"])
    q, k = rope(q, args), rope(k, args)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HEAD_DIM)
    p = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
    h = h + jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, -1) @ layer["wo"]
    if args.mlp:
      h = h + jax.nn.gelu(rms(h, layer["ln2"]) @ layer["w1"]) @ layer["w2"]
  return rms(h, params["lnf"]) @ params["out"]


def main(argv=None):
  args = parse_args(argv)

  def loss(params, x, y, mask):
    logits = forward(params, x, args)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
    right = logits.argmax(-1) == y
    return (nll * mask).sum() / mask.sum(), (right * mask).sum() / mask.sum()

  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, 100, args.steps),
                    weight_decay=0.1, b2=0.95)

  @jax.jit
  def step(params, state, x, y, mask):
    (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(params, x, y, mask)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value, acc

  params = init(jax.random.key(0), args)
  state = opt.init(params)
  t0 = time.time()
  for i in range(args.steps):
    params, state, value, acc = step(params, state, *batch(i, args.T))
    if i % 500 == 0 or i == args.steps - 1:
      print(f"{vars(args)} step {i} loss {float(value):.3f} acc {float(acc):.3f} "
            f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
  main()
