"""Tasks: what the one trainer needs to know about a kind of training.

A task builds the model and provides pure functions:

  init(rng, images) -> variables                        {"params", optional "batch_stats"}
  loss(params, extra, batch, rng) -> (loss, (metrics, new_extra))   train mode; extra = batch_stats
  evaluate(variables, batch) -> per-batch sums          {"count": examples, name: sum, ...}; the trainer
                                                        reports eval/<name> = sum / count

Other tasks (distillation, token labeling, MAE, seq2seq) provide the same three.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vit_jax.data import mixing
from vit_jax.models.mae import MaskedAutoencoder, reconstruction_loss
from vit_jax.models.vit import VisionTransformer


class Classification:
  """Supervised image classification: softmax cross-entropy, label smoothing, mixup / CutMix."""

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    model = config["model"]
    settings = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    settings["num_classes"] = num_classes
    self.settings = settings
    self.model = VisionTransformer(**settings)
    self.num_classes = num_classes
    self.label_smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    self.mix = dict(config.get("mixup") or {})

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    return dict(self.model.init({"params": rng, "dropout": rng}, images))

  def loss(self, params, extra: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array):
    r_mix, r_drop = jax.random.split(rng)
    labels = jax.nn.one_hot(batch["label"], self.num_classes)
    images, labels = mixing.mix(r_mix, batch["image"], labels, **self.mix)
    if self.label_smoothing:
      labels = optax.smooth_labels(labels, self.label_smoothing)
    variables = {"params": params, **extra}
    (logits, _), new_extra = self.model.apply(variables, images, train=True, rngs={"dropout": r_drop},
                                              mutable=list(extra))
    loss = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    correct = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32))
    return loss, ({"train/accuracy": correct}, dict(new_extra))

  def evaluate(self, variables: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    logits, _ = self.model.apply(variables, batch["image"])
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(losses * mask), "accuracy": jnp.sum(correct * mask), "count": jnp.sum(mask)}


class MaskedPretraining:
  """MAE pre-training: the reconstruction loss of `MaskedAutoencoder` (labels are not used)."""

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    del num_classes
    model = config["model"]
    self.settings = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    self.model = MaskedAutoencoder(**self.settings)

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    return dict(self.model.init({"params": rng, "masking": rng, "dropout": rng}, images))

  def loss(self, params, extra: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array):
    r_mask, r_drop = jax.random.split(rng)
    loss, _ = self.model.apply({"params": params, **extra}, batch["image"], train=True,
                               rngs={"masking": r_mask, "dropout": r_drop})
    return loss, ({}, dict(extra))

  def evaluate(self, variables: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Reconstruction loss per example with a fixed masking noise, so evaluations are comparable."""
    images = batch["image"]
    b = images.shape[0]
    grid = (images.shape[1] // self.model.patch_size, images.shape[2] // self.model.patch_size)
    noise = jax.random.uniform(jax.random.key(0), (b, grid[0] * grid[1]))
    _, out = self.model.apply(variables, images, noise=noise)
    per_example = jax.vmap(lambda p, t, m: reconstruction_loss(p[None], t[None], m[None], self.model.norm_pix_loss))(
        out["pred"], out["target"], out["mask"])
    return {"loss": jnp.sum(per_example * batch["mask"]), "count": jnp.sum(batch["mask"])}


TASKS = {"classification": Classification, "mae": MaskedPretraining}


def get_task(config: Mapping[str, Any], num_classes: int):
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}: choose one of {sorted(TASKS)}.")
  return TASKS[name](config, num_classes)
