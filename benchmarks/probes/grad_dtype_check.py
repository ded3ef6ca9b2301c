"""Compiled GPU gradients of sparse_attention per dtype and head dim vs the float32 XLA path."""
import jax, jax.numpy as jnp, msa_jax
for dt, d in [("float32", 64), ("float32", 128), ("bfloat16", 128), ("bfloat16", 256), ("float16", 256), ("float32", 256)]:
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  b, t, s, hq, g = 1, 512, 2048, 16, 1
  q = jax.random.normal(key[0], (b, t, hq, d), dt); k = jax.random.normal(key[1], (b, s, g, d), dt)
  v = jax.random.normal(key[2], (b, s, g, d), dt)
  pos = jnp.arange(t)[None] + s - t
  ids = jax.random.randint(key[3], (b, t, g, 8), 0, s // 128)
  loss = lambda impl: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(msa_jax.sparse_attention(q, k, v, ids, q_positions=pos, implementation=impl).astype(jnp.float32))), argnums=(0, 1, 2)))
  try:
    got = loss("pallas_gpu")(q, k, v)
    want = loss("xla")(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    errs = [float(jnp.linalg.norm(a.astype(jnp.float32) - w) / jnp.linalg.norm(w)) for a, w in zip(got, want)]
    print(dt, d, "rel err dq dk dv", ["%.2e" % e for e in errs], "finite", all(bool(jnp.isfinite(a).all()) for a in got))
  except Exception as e:
    print(dt, d, "FAIL", type(e).__name__, str(e)[:200])
