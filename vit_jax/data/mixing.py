"""On-device mixup and CutMix (inside the jitted train step).

Each example is mixed with its partner, the neighbouring row (rows 2k and 2k + 1 swap), one mixing
coefficient per batch.  Pairing neighbours keeps every pair on one device whenever each device's share
of the batch has an even number of rows, so mixing moves no data between devices (reversing the global
batch would send every image across the mesh).  Labels are one-hot (or soft) `[batch, classes]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def partner(a: jax.Array) -> jax.Array:
  """Each row's mixing partner along axis 0: rows 2k and 2k + 1 swap; an odd last row is its own."""
  n = a.shape[0]
  even = n - n % 2
  pairs = a[:even].reshape(even // 2, 2, *a.shape[1:])[:, ::-1].reshape(even, *a.shape[1:])
  return pairs if even == n else jnp.concatenate([pairs, a[even:]], axis=0)


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """x = lam * x + (1 - lam) * partner(x), lam ~ Beta(alpha, alpha); labels likewise."""
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda a: lam * a + (1 - lam) * partner(a)
  return mix(images), mix(labels)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
  """A boolean `[height, width]` box covering about (1 - lam) of the image, centred uniformly at random."""
  ry, rx = jax.random.uniform(rng, (2,))
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = jnp.round(height * cut), jnp.round(width * cut)
  cy, cx = jnp.floor(ry * height), jnp.floor(rx * width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2 + ch % 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2 + cw % 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """Paste a box of partner(x) into x; labels weighted by the box's actual area."""
  r_lam, r_box = jax.random.split(rng)
  lam = jax.random.beta(r_lam, alpha, alpha)
  box = cutmix_box(r_box, images.shape[1], images.shape[2], lam)
  images = jnp.where(box[None, :, :, None], partner(images), images)
  kept = 1.0 - jnp.mean(box.astype(jnp.float32))
  return images, kept * labels + (1 - kept) * partner(labels)


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0, switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Mixup, CutMix, or (both enabled) one of them per batch with probability `switch_prob` for CutMix."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  if cutmix_alpha <= 0:
    return mixup(rng, images, labels, mixup_alpha)
  if mixup_alpha <= 0:
    return cutmix(rng, images, labels, cutmix_alpha)
  r_switch, r_mix = jax.random.split(rng)
  return jax.lax.cond(jax.random.uniform(r_switch) < switch_prob,
                      lambda: cutmix(r_mix, images, labels, cutmix_alpha),
                      lambda: mixup(r_mix, images, labels, mixup_alpha))
