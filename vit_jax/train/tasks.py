"""Tasks: what the one trainer needs to know about a kind of training.

A task builds the model and provides pure functions:

  init(rng, images) -> variables                        {"params", optional "batch_stats"}
  loss(params, extra, batch, rng, constants) -> (loss, (metrics, new_extra))
                                                        train mode; extra = batch_stats; constants =
                                                        the task's `constants` (e.g. a teacher's weights),
                                                        passed in by the trainer, never trained or saved
  evaluate(variables, batch) -> per-batch sums          {"count": examples, name: sum, ...}; the trainer
                                                        reports eval/<name> = sum / count

Tasks: classification, distill (DeiT), token_label (LV-ViT), mae.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vit_jax.data import mixing, score_maps
from vit_jax.models.mae import MaskedAutoencoder, reconstruction_loss
from vit_jax.models.vit import VisionTransformer
from vit_jax.train import losses


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
    self.constants: dict[str, Any] = {}

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    return dict(self.model.init({"params": rng, "dropout": rng}, images))

  def loss(self, params, extra: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
           constants: Mapping[str, Any] | None = None):
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
    self.constants: dict[str, Any] = {}

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    return dict(self.model.init({"params": rng, "masking": rng, "dropout": rng}, images))

  def loss(self, params, extra: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
           constants: Mapping[str, Any] | None = None):
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


def load_teacher(path: str, num_classes: int, overrides: Mapping[str, Any] | None = None):
  """`(model, variables)` of a trained classifier: our checkpoint directory or a published `.npz`."""
  import os

  from vit_jax import checkpoint
  from vit_jax.interop import common, npz

  if not path:
    raise ValueError("The distill task needs a teacher: set config.distill.teacher to a checkpoint directory "
                     "or an .npz file.")
  if os.path.isdir(path):
    variables, saved = checkpoint.load_variables(path)
    if "model" not in saved:
      raise ValueError(f"{path!r} has no saved model settings; set config.distill.teacher_model.")
    settings = dict(saved["model"])
  elif os.path.exists(path):
    params = npz.load_npz(path)
    variables, settings = {"params": params}, common.infer_settings(params)
  else:
    raise FileNotFoundError(f"No teacher checkpoint at {path!r}.")
  settings.update(dict(overrides or {}))
  if settings.get("num_classes") != num_classes:
    raise ValueError(f"The teacher at {path!r} predicts {settings.get('num_classes')} classes, the data has "
                     f"{num_classes}: distil from a teacher trained on the same labels.")
  return VisionTransformer(**settings), variables


class Distillation(Classification):
  """DeiT: the student learns from the labels and from a frozen teacher run on the same (mixed) batch.

  config.distill: teacher (path), teacher_model (setting overrides), type ("hard" / "soft"), alpha, tau.
  The student's `head_dist` (distilled=True) takes the distillation term; without one the class head does.
  """

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    super().__init__(config, num_classes)
    d = dict(config["distill"])
    if d.get("type") not in ("hard", "soft"):
      raise ValueError(f"Unknown distill.type {d.get('type')!r}: choose 'hard' or 'soft'.")
    self.kind, self.alpha, self.tau = d["type"], float(d.get("alpha", 0.5)), float(d.get("tau", 1.0))
    self.teacher, teacher_variables = load_teacher(d.get("teacher"), num_classes, d.get("teacher_model"))
    self.constants = {"teacher": teacher_variables}

  def loss(self, params, extra, batch, rng, constants=None):
    r_mix, r_drop = jax.random.split(rng)
    labels = jax.nn.one_hot(batch["label"], self.num_classes)
    images, labels = mixing.mix(r_mix, batch["image"], labels, **self.mix)
    if self.label_smoothing:  # the true labels only; the teacher's labels are not smoothed
      labels = optax.smooth_labels(labels, self.label_smoothing)
    teacher_logits, _ = self.teacher.apply(constants["teacher"], images)  # inference mode
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    (logits, out), new_extra = self.model.apply({"params": params, **extra}, images, train=True,
                                                rngs={"dropout": r_drop}, mutable=list(extra))
    student, student_dist = out.get("logits_cls", logits), out.get("logits_dist", logits)
    if self.kind == "hard":
      per_example = losses.hard_distillation(student, student_dist, labels, teacher_logits)
    else:
      per_example = losses.soft_distillation(student, student_dist, labels, teacher_logits, alpha=self.alpha,
                                             tau=self.tau)
    agree = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32))
    correct = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32))
    return jnp.mean(per_example), ({"train/accuracy": correct, "train/teacher_agreement": agree}, dict(new_extra))


class TokenLabeling(Classification):
  """LV-ViT: class-token and per-token soft targets from dense score maps, with MixToken.

  config.token_label: beta (token-loss weight, 0.5), mixtoken (bool), ground_truth (mix the true label into
  the class target as the reference's --ground-truth does), label_smoothing of the targets (0.1).
  """

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    super().__init__(config, num_classes)
    if not self.settings.get("token_head"):
      raise ValueError("The token_label task needs a model with token_head=True (an LV-ViT variant).")
    t = dict(config.get("token_label") or {})
    self.beta = float(t.get("beta", 0.5))
    self.mixtoken = bool(t.get("mixtoken", True))
    self.ground_truth = bool(t.get("ground_truth", False))
    self.target_smoothing = float(t.get("label_smoothing", 0.1))
    ph, pw = (self.settings["patch_size"],) * 2 if isinstance(self.settings["patch_size"], int) else \
        tuple(self.settings["patch_size"])
    self.patch = (int(ph), int(pw))

  def loss(self, params, extra, batch, rng, constants=None):
    r_mix, r_drop = jax.random.split(rng)
    images = batch["image"]
    grid = (images.shape[1] // self.patch[0], images.shape[2] // self.patch[1])
    cls_targets, token_targets = score_maps.token_targets(batch, grid, self.num_classes, self.target_smoothing)
    if self.ground_truth:  # 0.5 / 0.5 when the teacher agrees with the label, else 0.9 teacher / 0.1 label
      truth = jax.nn.one_hot(batch["label"], self.num_classes)
      agree = (jnp.argmax(cls_targets, -1) == batch["label"]).astype(jnp.float32)[:, None]
      r = 0.9 - 0.4 * agree
      cls_targets = r * cls_targets + (1 - r) * truth
    box, kept = losses.mixtoken_box(r_mix, grid) if self.mixtoken else (None, 1.0)
    (logits, out), new_extra = self.model.apply({"params": params, **extra}, images, train=True, mix_box=box,
                                                rngs={"dropout": r_drop}, mutable=list(extra))
    cls_targets = kept * cls_targets + (1 - kept) * cls_targets[::-1]
    per_example = losses.token_labeling(out["logits_cls"], out["token_logits"], cls_targets, token_targets,
                                        self.beta)
    correct = jnp.mean((jnp.argmax(out["logits_cls"], -1) == batch["label"]).astype(jnp.float32))
    return jnp.mean(per_example), ({"train/accuracy": correct}, dict(new_extra))


TASKS = {"classification": Classification, "distill": Distillation, "token_label": TokenLabeling,
         "mae": MaskedPretraining}


def get_task(config: Mapping[str, Any], num_classes: int):
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}: choose one of {sorted(TASKS)}.")
  return TASKS[name](config, num_classes)
