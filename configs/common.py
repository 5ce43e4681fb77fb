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
