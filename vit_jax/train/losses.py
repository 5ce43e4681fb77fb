"""Teacher-guided losses: DeiT distillation and LV-ViT token labeling.  All return per-example values.

DeiT (Touvron et al. 2021), student logits z_s (cls head) and z_d (distillation
head; the cls head again for a student without one), teacher logits z_t, target
distribution y (one-hot, mixed and/or smoothed):

  hard:  1/2 CE(z_s, y) + 1/2 CE(z_d, argmax z_t)          (teacher labels not smoothed)
  soft:  (1 - alpha) CE(z_s, y) + alpha tau^2 KL(softmax(z_t / tau) || softmax(z_d / tau))

The KL is summed over classes per example (the textbook form).  The reference
code divides its summed KL by batch x classes instead of batch, which equals
this loss with alpha / classes in the distillation term.

LV-ViT token labeling (Jiang et al. 2021): CE(z_cls, y_cls) + beta * mean over
tokens of CE(z_token, y_token), with soft targets y.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-sum_c targets_c log softmax(logits)_c over the last axis."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def hard_distillation(student: jax.Array, student_dist: jax.Array, targets: jax.Array,
                      teacher: jax.Array) -> jax.Array:
  """DeiT's hard-label distillation, per example."""
  teacher_labels = jax.nn.one_hot(jnp.argmax(teacher, -1), teacher.shape[-1])
  return 0.5 * soft_cross_entropy(student, targets) + 0.5 * soft_cross_entropy(student_dist, teacher_labels)


def soft_distillation(student: jax.Array, student_dist: jax.Array, targets: jax.Array, teacher: jax.Array, *,
                      alpha: float, tau: float) -> jax.Array:
  """Hinton-style distillation with temperature `tau`, per example."""
  log_p_teacher = jax.nn.log_softmax(teacher.astype(jnp.float32) / tau, axis=-1)
  log_p_student = jax.nn.log_softmax(student_dist.astype(jnp.float32) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return (1 - alpha) * soft_cross_entropy(student, targets) + alpha * tau ** 2 * kl


def token_labeling(cls_logits: jax.Array, token_logits: jax.Array, cls_targets: jax.Array,
                   token_targets: jax.Array, beta: float) -> jax.Array:
  """Class-token CE plus `beta` x the mean over tokens of the per-token soft CE, per example."""
  dense = jnp.mean(soft_cross_entropy(token_logits, token_targets), axis=-1)
  return soft_cross_entropy(cls_logits, cls_targets) + beta * dense


def mixtoken_box(rng: jax.Array, grid: tuple[int, int], alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """MixToken's box on the token grid: `(box (top, left, bottom, right), kept fraction)`.

  lambda ~ Beta(alpha, alpha); the box has sides int(H sqrt(1 - lambda)) and
  int(W sqrt(1 - lambda)) around a uniform centre, clipped to the grid (CutMix's
  rule); the kept fraction 1 - box area / (H W) weighs the class targets.
  """
  h, w = grid
  r_lam, r_y, r_x = jax.random.split(rng, 3)
  lam = jax.random.beta(r_lam, alpha, alpha)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(r_y, (), 0, h), jax.random.randint(r_x, (), 0, w)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  left, right = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  kept = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (h * w)
  return jnp.stack([top, left, bottom, right]), kept
