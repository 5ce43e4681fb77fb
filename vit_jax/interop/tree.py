"""Flat views of parameter trees and loud key diffs between a checkpoint and a model.

Keys are `/`-joined paths (`Transformer/encoderblock_0/LayerNorm_0/scale`), the
form used by every `.npz` checkpoint of the ViT family.  `merge_params` is the
one place where a loaded tree meets a model's freshly initialised one: it
fails listing every missing, unexpected and shape-mismatched key, unless a
`dont_load` regular expression says to keep the model's own value.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import numpy as np

SEP = "/"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": x}}` -> `{"a/b": x}` (empty sub-trees disappear)."""
  flat = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      flat.update(flatten(v, key + SEP))
    else:
      flat[key] = v
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a/b": x}` -> `{"a": {"b": x}}`."""
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    *path, leaf = key.split(SEP)
    node = tree
    for p in path:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"Key {key!r} nests under a leaf {p!r}.")
    node[leaf] = v
  return tree


class ParamMismatchError(ValueError):
  """A checkpoint's keys or shapes do not fit the model."""


class CheckpointError(ValueError):
  """A file that cannot be read as a checkpoint (missing, truncated, corrupt, wrong kind)."""


@dataclasses.dataclass
class ParamDiff:
  missing: list[str]
  unexpected: list[str]
  mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, checkpoint, model)

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.mismatched)

  def describe(self, limit: int = 20) -> str:
    def lines(title, items):
      if not items:
        return []
      shown = [f"    {i}" for i in items[:limit]]
      if len(items) > limit:
        shown.append(f"    ... and {len(items) - limit} more")
      return [f"  {title} ({len(items)}):"] + shown
    return "\n".join(
        lines("missing from the checkpoint", self.missing)
        + lines("unexpected in the checkpoint", self.unexpected)
        + lines("shape mismatch (checkpoint vs model)",
                [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched]))


def diff_params(params: Mapping[str, Any], expected: Mapping[str, Any]) -> ParamDiff:
  """Keys of `expected` (the model) absent from `params`, extra keys, and shape mismatches."""
  got, want = flatten(params), flatten(expected)
  return ParamDiff(
      missing=sorted(set(want) - set(got)),
      unexpected=sorted(set(got) - set(want)),
      mismatched=sorted((k, tuple(np.shape(got[k])), tuple(np.shape(want[k])))
                        for k in set(got) & set(want) if np.shape(got[k]) != np.shape(want[k])))


def _compile(patterns: Iterable[str] | str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"dont_load pattern {p!r} is not a valid regular expression: {e}.") from None
  return out


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def merge_params(loaded: Mapping[str, Any], init: Mapping[str, Any], *,
                 dont_load: Iterable[str] | str = (), what: str = "checkpoint") -> dict[str, Any]:
  """The model's tree (`init`) with every value taken from `loaded`.

  Keys matching a `dont_load` regular expression (searched in the `/`-joined
  path, e.g. `"^head/"`) keep the model's value, and such keys may be absent
  from or extra in the checkpoint.  Anything else that does not line up raises
  `ParamMismatchError` listing all the problems at once.  Loaded values are cast
  to the model's dtypes.
  """
  patterns = _compile(dont_load)
  skip = lambda k: any(p.search(k) for p in patterns)
  got, want = flatten(loaded), flatten(init)
  diff = diff_params(loaded, init)
  diff = ParamDiff([k for k in diff.missing if not skip(k)], [k for k in diff.unexpected if not skip(k)],
                   [m for m in diff.mismatched if not skip(m[0])])
  if diff:
    raise ParamMismatchError(
        f"The {what} does not match the model:\n{diff.describe()}\n"
        "Fix the model settings (variant, num_classes, pool_type, representation_size, image size), or "
        "pass dont_load regular expressions for the keys to keep from the model's own initialisation "
        "(e.g. '^head/' to fine-tune with a new head).")
  merged = {k: (v if skip(k) or k not in got else np.asarray(got[k]).astype(_dtype(v)))
            for k, v in want.items()}
  return unflatten(merged)
