"""Model checkpoints for every tool: the weights and config of an orbax directory, read and written.

The trainer's own saving and resuming of whole train states (optimizer, data position,
preemption) is `vit_jax.train.resume`; this module reads the model out of those directories and
writes parameter-only ones (convert).

Layout (an orbax `CheckpointManager` root, one sub-directory per step):

    DIR/<step>/params/   the parameter tree (orbax StandardSave)
    DIR/<step>/state/    or a whole train state whose "params" entry is the tree
    DIR/<step>/config/   JSON: {"model": VisionTransformer settings, "image_size": [h, w], ...}
    DIR/<step>/checksums/  JSON: two 32-bit sums per array (`vit_jax.checksum`), verified by `load`

orbax writes each step to a temporary directory and renames it when complete,
so a crash or a kill mid-save never touches the last good step.  `load`
accepts the step directory, the manager root (newest step) or a work
directory with a `checkpoints/` sub-directory.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np

from vit_jax.interop.tree import CheckpointError

CHECKPOINTS_SUBDIR = "checkpoints"


def settings_to_json(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Model settings with tuples as lists and dtypes by name, for a JSON file."""
  out = {}
  for k, v in dict(settings).items():
    if k in ("dtype", "param_dtype") and v is not None:
      v = np.dtype(v).name
    elif isinstance(v, tuple):
      v = list(v)
    out[k] = v
  return out


def settings_from_json(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `settings_to_json` for the fields that need it."""
  import jax.numpy as jnp

  out = dict(settings)
  for k in ("dtype", "param_dtype"):
    if isinstance(out.get(k), str):
      out[k] = jnp.dtype(out[k])
  if isinstance(out.get("patch_size"), list):
    out["patch_size"] = tuple(out["patch_size"])
  return out


def save(directory: str | os.PathLike, params: Mapping[str, Any], *, config: Mapping[str, Any],
         step: int = 0, extra: Mapping[str, Any] | None = None) -> str:
  """Save `params` and `config` (JSON-serialisable; "model" holds the settings) as `directory/<step>`.

  `extra`: other variable collections ({"batch_stats": ...}); the step then holds a `state` item
  {"params", "extra"}, as the trainer writes, which `load_variables` reads back whole.
  """
  import orbax.checkpoint as ocp

  from vit_jax.files import path

  directory = path(directory)
  config = dict(config)
  if "model" in config:
    config["model"] = settings_to_json(config["model"])
  from vit_jax import checksum

  with ocp.CheckpointManager(directory) as manager:
    item, tree = ("state", {"params": params, "extra": dict(extra)}) if extra else ("params", params)
    manager.save(step, args=ocp.args.Composite(**{item: ocp.args.StandardSave(tree)},
                                               config=ocp.args.JsonSave(config),
                                               checksums=ocp.args.JsonSave(checksum.tree_checksums(tree))))
    manager.wait_until_finished()
  return os.fspath(directory / str(step))


def find_step_dir(path: str | os.PathLike) -> str:
  """The step directory that `path` names: itself, the newest step of a manager root, or of DIR/checkpoints.

  Local paths and object-store URIs (gs://...) alike.
  """
  from vit_jax.files import path as as_path

  root = as_path(path)
  if not root.is_dir():
    raise CheckpointError(f"No checkpoint directory at {os.fspath(root)!r}.")
  if (root / "_CHECKPOINT_METADATA").exists() or (root / "config").is_dir():
    return os.fspath(root)
  if (root / CHECKPOINTS_SUBDIR).is_dir():
    return find_step_dir(root / CHECKPOINTS_SUBDIR)
  steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and d.is_dir())
  if not steps:
    raise CheckpointError(f"{os.fspath(root)!r} holds no checkpoint: expected a step directory (with params/ and "
                          "config/), a directory of numbered steps, or a work directory with checkpoints/.")
  return os.fspath(root / str(steps[-1]))


def item_metadata(item_dir) -> Any:
  """The saved tree of one orbax item (`<step>/state`, `<step>/params`), leaves with shape and dtype."""
  import orbax.checkpoint as ocp

  quiet = logging.getLogger("absl")  # orbax warns that the item has no metadata file of its own
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  try:
    return ocp.PyTreeCheckpointer().metadata(item_dir).item_metadata.tree
  finally:
    quiet.setLevel(level)


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(params, config)` from a native checkpoint; params are numpy arrays on the host."""
  variables, config = load_variables(path)
  return variables["params"], config


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, config)`: {"params", plus "batch_stats" etc. of a train state} as host numpy arrays."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  step_dir = find_step_dir(path)
  item = next((i for i in ("params", "state") if (epath.Path(step_dir) / i).is_dir()), None)
  if item is None:
    raise CheckpointError(f"{step_dir!r} has neither params/ nor state/: not a vit_jax checkpoint.")
  has_config = (epath.Path(step_dir) / "config").is_dir()
  has_sums = (epath.Path(step_dir) / "checksums").is_dir()
  try:
    # Every array as whole host numpy, whatever mesh and number of processes wrote it (orbax would
    # otherwise try to rebuild the saved sharding, whose devices need not exist here).
    tree = item_metadata(epath.Path(step_dir) / item)
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    args = {item: ocp.args.PyTreeRestore(restore_args=as_numpy)}
    if has_config:
      args["config"] = ocp.args.JsonRestore()
    if has_sums:
      args["checksums"] = ocp.args.JsonRestore()
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(epath.Path(step_dir),
                                                                         args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"Cannot restore {step_dir!r} ({type(e).__name__}: {e}): the checkpoint is "
                          "incomplete or corrupt; use an earlier step.") from None
  if has_sums:
    from vit_jax import checksum

    bad = checksum.mismatches(restored["checksums"] or {}, restored[item])
    if bad:
      raise CheckpointError(f"{step_dir!r} is damaged: {len(bad)} array(s) do not match their checksums "
                            f"({', '.join(bad[:3])}); use an earlier step.")
  variables = {"params": restored[item]}
  if item == "state":
    if "params" not in restored[item]:
      raise CheckpointError(f"The train state in {step_dir!r} has no 'params' entry.")
    variables = {"params": restored[item]["params"], **(restored[item].get("extra") or {})}
  config = dict(restored["config"]) if has_config else {}
  if "model" in config:
    config["model"] = settings_from_json(config["model"])
  to_host = lambda t: {k: to_host(v) for k, v in t.items()} if isinstance(t, Mapping) else np.asarray(t)
  return to_host(variables), config
