"""Tasks: what the one trainer needs to know about a kind of training.

A task builds the model and provides pure functions:

  init(rng, images) -> variables                        {"params", optional "batch_stats"}
  loss(params, extra, batch, rng, constants) -> (loss, (metrics, new_extra))
                                                        train mode; extra = batch_stats; constants =
                                                        the task's `constants` (e.g. a teacher's weights)
                                                        plus "step", passed in by the trainer, never
                                                        trained or saved
  evaluate(variables, batch) -> per-batch sums          {"count": examples, name: sum, ...}; the trainer
                                                        reports eval/<name> = sum / count

Optional, for tasks whose inputs are not images (seq2seq):
  dummy_input() -> batch                                shapes for init; init then gets the whole batch
  evaluate may also return per-example arrays under keys starting with "_"; the trainer concatenates
  them over the evaluation set (padding dropped) and reports summarize(arrays) -> {name: value}.
  saved_config() -> dict                                stored with every checkpoint (e.g. vocabularies)

Tasks: classification, distill (DeiT), token_label (LV-ViT), mae, igpt (Image GPT), seq2seq.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.data import mixing, score_maps, text
from vit_jax.models.mae import MaskedAutoencoder, reconstruction_loss
from vit_jax.models.seq2seq import BiRNNClassifier, Seq2Seq
from vit_jax.models.vit import VisionTransformer
from vit_jax.train import losses


def build_classifier(settings: Mapping[str, Any]):
  """A classifier from its settings: a ViT, `family="swin"` for a Swin Transformer (V1 or V2),
  `family="cait"` for CaiT, or `family="birnn"` for the row-by-row bi-directional RNN."""
  settings = dict(settings)
  family = settings.pop("family", "vit")
  if family == "vit":
    return VisionTransformer(**settings)
  if family == "swin":
    from vit_jax.models.swin import SwinTransformer
    if settings.pop("distilled", False):
      raise ValueError("Swin has no distillation token: set model.distilled=False; the distill task then trains "
                       "the class head on both the labels and the teacher.")
    return SwinTransformer(**settings)
  if family == "cait":
    from vit_jax.models.cait import CaiT
    return CaiT(**settings)
  if family == "birnn":
    return BiRNNClassifier(**settings)
  if family == "igpt":
    from vit_jax.models.igpt import ImageGPTClassifier
    colours = load_palette(str(settings.pop("palette", None) or "grey:17"))
    settings.setdefault("vocab_size", len(colours))
    if settings["vocab_size"] != len(colours):
      raise ValueError(f"model.vocab_size={settings['vocab_size']} but the palette has {len(colours)} colours.")
    return ImageGPTClassifier(palette=tuple(map(tuple, colours.tolist())), **settings)
  raise ValueError(f"Unknown model family {family!r}: choose 'vit', 'swin', 'cait', 'igpt' or 'birnn'.")


class Classification:
  """Supervised image classification: softmax cross-entropy, label smoothing, mixup / CutMix."""

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    model = config["model"]
    settings = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    settings["num_classes"] = num_classes
    self.settings = settings
    self.model = build_classifier(settings)
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
  """`(model, variables)` of a trained classifier (a ViT or a Swin): our checkpoint directory, a published
  `.npz`, or PyTorch weights (`.pth`, `.safetensors`, a Hugging Face / timm folder)."""
  from vit_jax import files
  from vit_jax.interop import load_variables

  if not path:
    raise ValueError("The distill task needs a teacher: set config.distill.teacher to a checkpoint directory, "
                     "an .npz or a PyTorch file.")
  if not files.path(path).exists():  # local or gs://...
    raise FileNotFoundError(f"No teacher checkpoint at {path!r}.")
  variables, saved = load_variables(path, hints=dict(overrides or {}))
  if saved.get("task") == "mae":
    raise ValueError(f"{path!r} is a masked autoencoder, not a classifier: distil from a trained classifier.")
  settings = dict(saved.get("model") or {}, **dict(overrides or {}))
  if not settings:
    raise ValueError(f"{path!r} has no saved model settings; set config.distill.teacher_model.")
  if settings.get("num_classes") != num_classes:
    raise ValueError(f"The teacher at {path!r} predicts {settings.get('num_classes')} classes, the data has "
                     f"{num_classes}: distil from a teacher trained on the same labels.")
  return build_classifier(settings), variables


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
    cls_targets = kept * cls_targets + (1 - kept) * mixing.partner(cls_targets)
    per_example = losses.token_labeling(out["logits_cls"], out["token_logits"], cls_targets, token_targets,
                                        self.beta)
    correct = jnp.mean((jnp.argmax(out["logits_cls"], -1) == batch["label"]).astype(jnp.float32))
    return jnp.mean(per_example), ({"train/accuracy": correct}, dict(new_extra))


SAMPLING_SCHEDULES = ("none", "constant", "linear", "exponential", "inverse_sigmoid")


def truth_probability(step: jax.Array, schedule: str, *, k: float = 1.0, decay_steps: int = 1,
                      min_prob: float = 0.0, prob: float = 1.0) -> jax.Array:
  """Scheduled sampling's epsilon_i, the probability of feeding the true previous token at step i.

  constant: `prob`; linear: 1 -> `min_prob` over `decay_steps`; exponential: k ** i (k < 1);
  inverse_sigmoid: k / (k + exp(i / k)) (k >= 1) -- the decays of Bengio et al. (2015), floored at
  `min_prob`.
  """
  i = jnp.asarray(step, jnp.float32)
  if schedule == "none":
    return jnp.float32(1.0)
  if schedule == "constant":
    p = jnp.float32(prob)
  elif schedule == "linear":
    p = 1.0 - (1.0 - min_prob) * jnp.minimum(i / max(decay_steps, 1), 1.0)
  elif schedule == "exponential":
    p = jnp.power(jnp.float32(k), i)
  elif schedule == "inverse_sigmoid":
    p = k / (k + jnp.exp(jnp.minimum(i / k, 80.0)))
  else:
    raise ValueError(f"Unknown scheduled_sampling.schedule {schedule!r}: choose one of {SAMPLING_SCHEDULES}.")
  return jnp.maximum(p, min_prob)


class SequenceToSequence:
  """Translation with `Seq2Seq`: token cross-entropy on non-padding positions, teacher forcing or
  scheduled sampling, and evaluation by teacher-forced loss / token accuracy plus greedy decoding
  (exact match, corpus BLEU and chrF on the decoded strings).

  config.scheduled_sampling: schedule (see `truth_probability`), k, decay_steps, min_prob, prob.
  The batch holds `source [B, S]` and `target [B, T + 1]` (start ... end); the decoder reads
  target[:, :-1] and predicts target[:, 1:].
  """
  needs_source_info = True
  unit = "pairs"

  def __init__(self, config: Mapping[str, Any], num_classes: int, source_info: Mapping[str, Any]):
    data: text.TextData = source_info["text"]
    model = config["model"]
    settings = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    settings.update(source_vocab=len(data.source_vocab), target_vocab=num_classes)
    if settings.get("kind") == "transformer":
      settings["max_len"] = max(int(settings.get("max_len") or 0), data.source_len, data.target_len)
    self.settings = settings
    self.model = Seq2Seq(**settings)
    self.data = data
    self.label_smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    sampling = dict(config.get("scheduled_sampling") or {})
    self.schedule = sampling.pop("schedule", "none")
    truth_probability(0, self.schedule, **sampling)  # unknown schedule or option: fail now
    self.sampling = sampling
    self.constants: dict[str, Any] = {}

  def dummy_input(self) -> dict[str, jax.Array]:
    return {"source": jnp.zeros((1, self.data.source_len), jnp.int32),
            "target": jnp.zeros((1, self.data.target_len + 1), jnp.int32)}

  def saved_config(self) -> dict[str, Any]:
    return {"source_vocab": {"level": self.data.source_vocab.level, "tokens": list(self.data.source_vocab.tokens)},
            "target_vocab": {"level": self.data.target_vocab.level, "tokens": list(self.data.target_vocab.tokens)},
            "source_len": self.data.source_len, "target_len": self.data.target_len}

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    return dict(self.model.init({"params": rng, "dropout": rng}, batch["source"], batch["target"][:, :-1]))

  def _token_loss(self, logits, targets):
    labels = jax.nn.one_hot(targets, logits.shape[-1])
    if self.label_smoothing:
      labels = optax.smooth_labels(labels, self.label_smoothing)
    mask = (targets != text.PAD_ID).astype(jnp.float32)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels) * mask
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
    return ce, correct, mask

  def loss(self, params, extra, batch, rng, constants=None):
    r_truth, r_drop = jax.random.split(rng)
    target_in, target_out = batch["target"][:, :-1], batch["target"][:, 1:]
    use_truth, p = None, jnp.float32(1.0)
    if self.schedule != "none":
      p = truth_probability((constants or {}).get("step", 0), self.schedule, **self.sampling)
      use_truth = jax.random.bernoulli(r_truth, p, target_in.shape)
    logits, _ = self.model.apply({"params": params, **extra}, batch["source"], target_in, use_truth=use_truth,
                                 deterministic=False, rngs={"dropout": r_drop})
    ce, correct, mask = self._token_loss(logits, target_out)
    tokens = jnp.maximum(mask.sum(), 1.0)
    return ce.sum() / tokens, ({"train/token_accuracy": correct.sum() / tokens, "train/truth_prob": p},
                               dict(extra))

  def evaluate(self, variables, batch):
    from vit_jax import decode  # noqa: PLC0415

    target_in, target_out = batch["target"][:, :-1], batch["target"][:, 1:]
    logits, _ = self.model.apply(variables, batch["source"], target_in)
    ce, correct, mask = self._token_loss(logits, target_out)
    decoded, _ = decode.greedy(self.model, variables, batch["source"], max_len=self.data.target_len)
    exact = jnp.all(decoded == target_out, axis=-1).astype(jnp.float32)
    m = batch["mask"]
    return {"count": m.sum(), "loss": jnp.sum(ce.sum(-1) / jnp.maximum(mask.sum(-1), 1.0) * m),
            "exact_match": jnp.sum(exact * m), "_correct": correct.sum(-1), "_tokens": mask.sum(-1),
            "_decoded": decoded, "_target": target_out}

  def summarize(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Token accuracy over all non-padding positions; corpus BLEU and chrF of the greedy translations."""
    from vit_jax.evaluate import bleu  # noqa: PLC0415

    vocab = self.data.target_vocab
    hyps = [vocab.decode(row) for row in arrays["_decoded"]]
    refs = [vocab.decode(row) for row in arrays["_target"]]
    return {"token_accuracy": float(arrays["_correct"].sum() / max(arrays["_tokens"].sum(), 1.0)),
            "bleu": bleu.corpus_bleu(hyps, [refs]).score, "chrf": bleu.corpus_chrf(hyps, [refs]).score}


def load_palette(spec: str) -> np.ndarray:
  """`"grey:17"` (`palette.grey_palette`) or the path of a `[K, C]` `.npy` palette (`palette.kmeans`)."""
  from vit_jax.data import palette

  if spec.startswith("grey:"):
    return palette.grey_palette(int(spec[len("grey:"):]))
  from vit_jax import files
  if not files.path(spec).exists():
    raise FileNotFoundError(f"No palette at {spec!r}: give 'grey:N' or a .npy of [colours, channels] in [-1, 1] "
                            "(vit_jax.data.palette.kmeans learns one).")
  with files.path(spec).open("rb") as f:
    table = np.load(f, allow_pickle=False)
  if table.ndim != 2 or not np.all(np.abs(table) <= 1.0 + 1e-6):
    raise ValueError(f"The palette {spec!r} must be [colours, channels] in [-1, 1], got shape {table.shape}.")
  return table.astype(np.float32)


class ImageGPTPretraining:
  """iGPT pre-training: next-token negative log-likelihood of the palette ids in raster order, the SOS first.

  config.palette: "grey:N" or a `.npy` palette; the images (in [-1, 1]) are quantised to it in the step.
  Reported as `loss` (nats per token) and `bits_per_dim` (bits per token: one token per pixel; for an RGB
  palette a token stands for the three channels, as in the paper's palette).
  """

  def __init__(self, config: Mapping[str, Any], num_classes: int):
    del num_classes
    from vit_jax.models.igpt import ImageGPT

    model = config["model"]
    settings = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    self.palette = load_palette(str(config.get("palette") or "grey:17"))
    settings.pop("family", None)
    settings.setdefault("vocab_size", len(self.palette))
    if settings["vocab_size"] != len(self.palette):
      raise ValueError(f"model.vocab_size={settings['vocab_size']} but the palette has {len(self.palette)} colours.")
    self.settings = dict(settings, channels=int(self.palette.shape[1]))
    self.model = ImageGPT(**settings)
    self.constants: dict[str, Any] = {}

  def tokens(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, C]` in [-1, 1] -> `[B, H * W]` ids of the nearest palette colours (raster order)."""
    from vit_jax.models.igpt import quantize

    if images.shape[1] * images.shape[2] > self.model.num_positions:
      raise ValueError(f"{images.shape[1]}x{images.shape[2]} images are {images.shape[1] * images.shape[2]} tokens, "
                       f"more than the model's {self.model.num_positions} positions.")
    return quantize(images, self.palette)

  def nll(self, variables, images, **kwargs) -> jax.Array:
    """Per-example mean negative log-likelihood (nats per token)."""
    from vit_jax.models.igpt import sos_shift

    ids = self.tokens(images)
    logits, _ = self.model.apply(variables, sos_shift(ids, self.model.vocab_size), **kwargs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids), axis=-1)

  def init(self, rng: jax.Array, images: jax.Array) -> dict[str, Any]:
    ids = jnp.zeros((1, images.shape[1] * images.shape[2]), jnp.int32)
    return dict(self.model.init({"params": rng, "dropout": rng}, ids))

  def loss(self, params, extra: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
           constants: Mapping[str, Any] | None = None):
    nll = jnp.mean(self.nll({"params": params, **extra}, batch["image"], train=True, rngs={"dropout": rng}))
    return nll, ({"train/bits_per_dim": nll / np.log(2.0)}, dict(extra))

  def evaluate(self, variables: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    nll, mask = self.nll(variables, batch["image"]), batch["mask"]
    return {"loss": jnp.sum(nll * mask), "bits_per_dim": jnp.sum(nll * mask) / np.log(2.0), "count": jnp.sum(mask)}


TASKS = {"classification": Classification, "distill": Distillation, "token_label": TokenLabeling,
         "mae": MaskedPretraining, "seq2seq": SequenceToSequence, "igpt": ImageGPTPretraining}


def get_task(config: Mapping[str, Any], num_classes: int, source_info: Mapping[str, Any] | None = None):
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}: choose one of {sorted(TASKS)}.")
  if getattr(TASKS[name], "needs_source_info", False):
    if not (source_info or {}).get("text"):
      raise ValueError(f"The {name} task needs text pairs: set config.data.name to 'en_fr_generated' or "
                       "'pairs:/path/to/fra.txt'.")
    task = TASKS[name](config, num_classes, source_info)
  else:
    task = TASKS[name](config, num_classes)
  return compute_in(task, config.get("dtype") or "float32")


def compute_in(task, dtype: str):
  """Mixed precision: the task's model computes in `dtype` ("bfloat16") while its parameters, the
  optimizer state, the losses, softmaxes and norm statistics stay float32 (the models upcast those).
  A compute dtype is how a run trains, not what the model is: the saved settings do not hold it."""
  if dtype == "float32":
    return task
  if dtype not in ("bfloat16", "float16"):
    raise ValueError(f"config.dtype={dtype!r}: choose 'float32' or 'bfloat16' (or 'float16').")
  if "dtype" not in getattr(type(task.model), "__dataclass_fields__", {}):
    raise ValueError(f"config.dtype={dtype!r}: the {type(task.model).__name__} model computes in float32 only; "
                     "set config.dtype='float32'.")
  task.model = task.model.clone(dtype=jnp.dtype(dtype))
  return task
