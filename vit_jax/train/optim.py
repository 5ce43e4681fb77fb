"""Optimizers and learning-rate schedules from a config, built from optax.

    tx, schedule = build(config.optim, params, total_steps=..., steps_per_epoch=..., batch_size=...)

config.optim fields:
  name: "adam" | "adamw" | "sgd" | "lars";  b1, b2, eps (adam*), momentum, nesterov (sgd, lars)
  mu_dtype: adam*: the first moment's dtype, e.g. "bfloat16" (half its memory, as big_vision offers);
    default: the parameters' (float32); the second moment always keeps the parameters' dtype
  lr: base learning rate;  scale_lr_by_batch: lr *= batch_size / 256 (the MAE / DeiT convention)
  schedule: warmup_{steps|epochs|examples}, decay ("cosine" | "linear" | "rsqrt" | "constant" | "mae_cosine"),
    min_lr (end value of cosine / linear / mae_cosine), timescale (rsqrt)
  weight_decay: adamw / sgd / lars: decoupled (added to the update, scaled by the learning rate);
    adam: coupled L2 (added to the gradient); per parameter times wd_mults
  wd_mults: [(regex, mult)], first match wins, unmatched -> 0 (default: kernels only)
  lr_mults: [(regex, mult)], unmatched -> 1;  frozen: [regex] (no update at all)
  layer_decay: layer-wise lr decay (BEiT / MAE fine-tuning): lr * decay**(L + 1 - layer_id), with
    layer_id 0 for the embeddings, i + 1 for encoder block i of L, L + 1 for everything after
  clip_norm: global-norm gradient clipping (0 / None: off)
(Gradient accumulation over micro-batches is done inside the train step: config.accumulate.)

Regular expressions are searched in the `/`-joined parameter path, e.g.
`Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from vit_jax.interop.tree import flatten, unflatten

DECAYS = ("cosine", "linear", "rsqrt", "constant", "mae_cosine")
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
DEFAULT_WD_MULTS = ((r"/kernel$|^embedding/kernel$", 1.0),)


def to_steps(config: Mapping[str, Any], name: str, *, steps_per_epoch: float, batch_size: int,
             default: int | None = None, minimum: int = 1) -> int:
  """`name_steps`, `name_epochs` or `name_examples` from `config`, in steps (exactly one may be set)."""
  given = {unit: config.get(f"{name}_{unit}") for unit in ("steps", "epochs", "examples")}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) > 1:
    raise ValueError(f"Give one of {name}_steps, {name}_epochs, {name}_examples; got {sorted(given)}.")
  if not given:
    if default is None:
      raise ValueError(f"Set one of {name}_steps, {name}_epochs or {name}_examples.")
    return default
  unit, value = next(iter(given.items()))
  if unit == "steps":
    steps = int(value)
  elif unit == "epochs":
    steps = int(round(value * steps_per_epoch))
  else:
    steps = int(round(value / batch_size))
  if steps < minimum:
    raise ValueError(f"config.{name}_{unit}={value} gives {steps} steps: it must give at least {minimum} "
                     f"({steps_per_epoch:g} steps per epoch at batch size {batch_size}).")
  return steps


def schedule(lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_lr: float = 0.0,
             timescale: int = 10_000) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup 0 -> lr over `warmup_steps`, then `decay` until `total_steps`.

  cosine / mae_cosine: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * t)), t = fraction of the decay phase
    (the MAE recipe's half-cycle cosine; the two names are the same curve);
  linear: lr -> min_lr;  rsqrt: lr * sqrt(timescale / max(step, timescale)) after warmup;  constant.
  """
  if decay not in DECAYS:
    raise ValueError(f"Unknown decay {decay!r}: choose one of {DECAYS}.")
  decay_steps = max(total_steps - warmup_steps, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = lr * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay in ("cosine", "mae_cosine"):
      after = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    elif decay == "linear":
      after = lr + (min_lr - lr) * t
    elif decay == "rsqrt":
      after = lr * jnp.sqrt(timescale / jnp.maximum(step, timescale))
    else:
      after = jnp.full_like(step, lr)
    return jnp.where(step < warmup_steps, warm, after)
  return fn


def _match(patterns: Sequence[tuple[str, float]], key: str, default: float) -> float:
  for pattern, value in patterns:
    if re.search(pattern, key):
      return float(value)
  return default


def layer_ids(params: Mapping[str, Any]) -> dict[str, int]:
  """Per parameter: 0 for embeddings, i + 1 for encoder block i (unrolled), L + 1 after the encoder.

  Swin's blocks `stage_s/block_j` are numbered in order over the stages, and the patch merging at the
  end of stage s shares the id of that stage's last block (as Swin fine-tuning recipes count them).
  CaiT's class-attention blocks `class_block_j` follow its self-attention blocks.
  """
  flat = flatten(params)
  if any("encoderblock/" in k for k in flat):
    raise ValueError("layer_decay needs unrolled blocks (model scan=False): a scanned block shares one "
                     "parameter across layers.")
  stage_depths: dict[int, int] = {}
  for k in flat:
    if m := re.search(r"^stage_(\d+)/block_(\d+)/", k):
      stage_depths[int(m[1])] = max(stage_depths.get(int(m[1]), 0), int(m[2]) + 1)
  before = {s: sum(d for t, d in stage_depths.items() if t < s) for s in stage_depths}
  blocks = {int(m.group(1)) for k in flat if (m := re.search(r"encoderblock_(\d+)/", k))}
  class_blocks = {int(m.group(1)) for k in flat if (m := re.search(r"^class_block_(\d+)/", k))}
  depth = len(blocks) + sum(stage_depths.values()) + len(class_blocks)
  ids = {}
  for k in flat:
    if m := re.search(r"encoderblock_(\d+)/", k):
      ids[k] = int(m.group(1)) + 1
    elif m := re.search(r"^class_block_(\d+)/", k):  # CaiT: after the self-attention blocks
      ids[k] = len(blocks) + int(m.group(1)) + 1
    elif m := re.search(r"^stage_(\d+)/block_(\d+)/", k):
      ids[k] = before[int(m[1])] + int(m[2]) + 1
    elif m := re.search(r"^stage_(\d+)/merge/", k):
      ids[k] = before[int(m[1])] + stage_depths[int(m[1])]
    elif re.search(r"^(embedding|embedding_norm|stem|cls|dist_token|Transformer/posembed_(input|peg)|wte|wpe)(/|$)", k):
      ids[k] = 0
    else:
      ids[k] = depth + 1
  return ids


def multipliers(params: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
  """(lr multiplier, weight-decay multiplier, trainable label) trees for `params`."""
  flat = flatten(params)
  lr_mults = [tuple(x) for x in config.get("lr_mults") or ()]
  wd_mults = [tuple(x) for x in (config.get("wd_mults") or DEFAULT_WD_MULTS)]
  frozen = list(config.get("frozen") or ())
  decay = config.get("layer_decay")
  ids = layer_ids(params) if decay else {}
  depth = max(ids.values()) - 1 if ids else 0
  lr, wd, label = {}, {}, {}
  for k in flat:
    lr[k] = _match(lr_mults, k, 1.0) * (decay ** (depth + 1 - ids[k]) if decay else 1.0)
    wd[k] = _match(wd_mults, k, 0.0)
    label[k] = "frozen" if any(re.search(p, k) for p in frozen) else "train"
  if frozen and all(v == "frozen" for v in label.values()):
    raise ValueError(f"frozen={frozen} freezes every parameter: nothing would train.")
  return unflatten(lr), unflatten(wd), unflatten(label)


def _map(fn, updates, *trees):
  """tree_map over `updates` that passes through optax's MaskedNode (frozen parameters)."""
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree_util.tree_map(lambda u, *r: u if masked(u) else fn(u, *r), updates, *trees, is_leaf=masked)


def _scale_by_tree(mults) -> optax.GradientTransformation:
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (_map(lambda u, m: u * m, updates, mults), state))


def _add_weight_decay(weight_decay: float, mults) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("Weight decay needs the parameters: call tx.update(grads, state, params).")
    return _map(lambda u, p, m: u + weight_decay * m * p if m else u, updates, params, mults), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None, key: str):
  if not name:
    return None
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}: choose one of {DTYPES}.")
  return jnp.dtype(name)


def build(config: Mapping[str, Any], params: Mapping[str, Any], *, total_steps: int, steps_per_epoch: float,
          batch_size: int) -> tuple[optax.GradientTransformation, Callable]:
  """`(tx, lr_schedule)` for `params` (shapes suffice) as described in the module docstring."""
  name = config.get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}: choose one of {OPTIMIZERS}.")
  base_lr = float(config["lr"]) * (batch_size / 256 if config.get("scale_lr_by_batch") else 1.0)
  sched_cfg = dict(config.get("schedule") or {})
  warmup = to_steps(sched_cfg, "warmup", steps_per_epoch=steps_per_epoch, batch_size=batch_size, default=0,
                    minimum=0)
  lr_fn = schedule(base_lr, total_steps, warmup, sched_cfg.get("decay", "cosine"),
                   float(sched_cfg.get("min_lr", 0.0)), int(sched_cfg.get("timescale", 10_000)))
  lr_mults, wd_mults, labels = multipliers(params, config)
  wd = float(config.get("weight_decay", 0.0) or 0.0)

  chain = []
  if config.get("clip_norm"):
    chain.append(optax.clip_by_global_norm(float(config["clip_norm"])))
  if name in ("adam", "adamw"):
    if wd and name == "adam":  # coupled L2: the decay goes through Adam's normalisation
      chain.append(_add_weight_decay(wd, wd_mults))
    chain.append(optax.scale_by_adam(b1=config.get("b1", 0.9), b2=config.get("b2", 0.999), eps=config.get("eps", 1e-8),
                                     mu_dtype=_dtype(config.get("mu_dtype"), "config.optim.mu_dtype")))
    if wd and name == "adamw":
      chain.append(_add_weight_decay(wd, wd_mults))
  elif name == "sgd":
    if wd:
      chain.append(_add_weight_decay(wd, wd_mults))
    if config.get("momentum"):
      chain.append(optax.trace(decay=float(config["momentum"]), nesterov=bool(config.get("nesterov", False))))
  else:  # LARS: weight decay inside the trust ratio, then momentum
    if wd:
      chain.append(_add_weight_decay(wd, wd_mults))
    chain.append(optax.scale_by_trust_ratio(trust_coefficient=config.get("trust_coefficient", 0.001)))
    chain.append(optax.trace(decay=float(config.get("momentum", 0.9)), nesterov=bool(config.get("nesterov", False))))
  chain += [optax.scale_by_learning_rate(lr_fn), _scale_by_tree(lr_mults)]
  tx = optax.chain(*chain)
  if any(v == "frozen" for v in jax.tree_util.tree_leaves(labels)):
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, lr_fn
