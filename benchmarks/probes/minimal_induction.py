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

p = argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--theta", type=float, default=1e4)
p.add_argument("--rot", type=int, default=32)
p.add_argument("--qknorm", type=int, default=0)
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--mlp", type=int, default=0)
p.add_argument("--T", type=int, default=256)
a = p.parse_args()
V, T, D, H, Dh, B, SEG = 256, a.T, 128, 4, 32, 32, 8
def example(rng):
  n = T + 1
  tok = rng.integers(4, V, size=n)
  tg = []
  for _ in range(4):
    dst = int(rng.integers(n // 2, n - SEG)); src = int(rng.integers(0, dst - SEG))
    tok[dst:dst + SEG] = tok[src:src + SEG]; tg += range(dst, dst + SEG - 1)
  m = np.zeros(T, np.float32); m[np.unique(tg)] = 1
  return tok[:-1], tok[1:], m
def batch(i):
  rng = np.random.default_rng(i)
  xs = [example(rng) for _ in range(B)]
  return tuple(np.stack(z) for z in zip(*xs))
def init(key):
  ks = iter(jax.random.split(key, 100))
  n = lambda *s: jax.random.normal(next(ks), s) * 0.02
  P = {"emb": n(V, D), "out": n(D, V), "layers": []}
  for _ in range(a.layers):
    L = {"wq": n(D, H * Dh), "wk": n(D, H * Dh), "wv": n(D, H * Dh), "wo": n(H * Dh, D),
         "qn": jnp.ones(Dh), "kn": jnp.ones(Dh), "ln1": jnp.ones(D), "ln2": jnp.ones(D)}
    if a.mlp: L |= {"w1": n(D, 4 * D), "w2": n(4 * D, D)}
    P["layers"].append(L)
  P["lnf"] = jnp.ones(D)
  return P
def rms(x, w): return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
def rope(x):
  r = a.rot; pos = jnp.arange(T)[:, None]
  f = a.theta ** (-jnp.arange(0, r, 2) / r); ang = pos * f
  c, s = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
  x1, x2 = x[..., :r // 2], x[..., r // 2:r]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., r:]], -1)
def fwd(P, x):
  h = P["emb"][x]
  mask = jnp.tril(jnp.ones((T, T), bool))
  for L in P["layers"]:
    y = rms(h, L["ln1"])
    q = (y @ L["wq"]).reshape(B, T, H, Dh); k = (y @ L["wk"]).reshape(B, T, H, Dh)
    v = (y @ L["wv"]).reshape(B, T, H, Dh)
    if a.qknorm: q, k = rms(q, L["qn"]), rms(k, L["kn"])
    q, k = rope(q), rope(k)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(Dh)
    s = jnp.where(mask, s, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(B, T, H * Dh)
    h = h + o @ L["wo"]
    if a.mlp: h = h + jax.nn.gelu(rms(h, L["ln2"]) @ L["w1"]) @ L["w2"]
  return rms(h, P["lnf"]) @ P["out"]
def loss(P, x, y, m):
  lg = fwd(P, x); lp = jax.nn.log_softmax(lg)
  nll = -jnp.take_along_axis(lp, y[..., None], -1)[..., 0]
  acc = (lg.argmax(-1) == y)
  return (nll * m).sum() / m.sum(), (acc * m).sum() / m.sum()
opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, 100, a.steps), weight_decay=0.1, b2=0.95)
P = init(jax.random.key(0)); S = opt.init(P)
@jax.jit
def step(P, S, x, y, m):
  (l, acc), g = jax.value_and_grad(loss, has_aux=True)(P, x, y, m)
  u, S = opt.update(g, S, P); return optax.apply_updates(P, u), S, l, acc
t0 = time.time()
for i in range(a.steps):
  P, S, l, acc = step(P, S, *batch(i))
  if i % 500 == 0 or i == a.steps - 1:
    print(f"{vars(a)} step {i} loss {float(l):.3f} acc {float(acc):.3f} {time.time()-t0:.0f}s", flush=True)
