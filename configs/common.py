"""Helpers shared by the config files."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`"variant=Ti/16,dataset=cifar10,runlocal"` -> ConfigDict over `defaults` (a bare name sets True).

  Values are Python literals where they parse, else strings; unknown names fail
  with the valid ones.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}: valid ones are {sorted(defaults)}.")
    if not sep:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return ml_collections.ConfigDict(out)


def durations(config: ml_collections.ConfigDict, *names: str) -> None:
  """Add `<name>_steps`, `<name>_epochs`, `<name>_examples` placeholders (set exactly one of each)."""
  for name in names:
    config[f"{name}_steps"] = placeholder(int)
    config[f"{name}_epochs"] = placeholder(float)
    config[f"{name}_examples"] = placeholder(int)


def distillation(config: ml_collections.ConfigDict, teacher: str, kind: str, name: str) -> bool:
  """Set `config.task` / `config.distill` for `distill=hard|soft|none` (DeiT's forms); True when distilling.

  `name` is the config file, for the errors.  The teacher is any classifier the loaders read, trained on
  the same labels; `distill.teacher_model` holds setting overrides (e.g. the activation of an `.npz`).
  """
  if kind not in ("hard", "soft", "none"):
    raise ValueError(f"Unknown distill={kind!r}: choose 'hard', 'soft' or 'none'.")
  distilled = kind != "none"
  if distilled and not teacher:
    raise ValueError(f"{name} needs teacher=PATH (a checkpoint directory, .npz or PyTorch weights) with "
                     f"distill={kind}, or distill=none.")
  config.task = "distill" if distilled else "classification"
  config.distill = ml_collections.ConfigDict(dict(teacher=teacher, type=kind if distilled else "hard",
                                                  alpha=0.5, tau=1.0))
  config.distill.teacher_model = ml_collections.ConfigDict()
  if kind == "soft":
    config.distill.update(alpha=0.1, tau=3.0)  # DeiT's soft-distillation baseline
  return distilled
