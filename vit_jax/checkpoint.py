"""Native checkpoints: orbax directories that hold the parameters and the config that built them.

Layout (an orbax `CheckpointManager` root, one sub-directory per step):

    DIR/<step>/params/   the parameter tree (orbax StandardSave)
    DIR/<step>/state/    or a whole train state whose "params" entry is the tree
    DIR/<step>/config/   JSON: {"model": VisionTransformer settings, "image_size": [h, w], ...}

orbax writes each step to a temporary directory and renames it when complete,
so a crash or a kill mid-save never touches the last good step.  `load`
accepts the step directory, the manager root (newest step) or a work
directory with a `checkpoints/` sub-directory.
"""

from __future__ import annotations

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
         step: int = 0) -> str:
  """Save `params` and `config` (JSON-serialisable; "model" holds the settings) as `directory/<step>`."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.fspath(directory))
  config = dict(config)
  if "model" in config:
    config["model"] = settings_to_json(config["model"])
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               config=ocp.args.JsonSave(config)))
    manager.wait_until_finished()
  return os.path.join(directory, str(step))


def find_step_dir(path: str | os.PathLike) -> str:
  """The step directory that `path` names: itself, the newest step of a manager root, or of DIR/checkpoints."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"No checkpoint directory at {path!r}.")
  if os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")) or os.path.isdir(os.path.join(path, "config")):
    return path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_SUBDIR)):
    return find_step_dir(os.path.join(path, CHECKPOINTS_SUBDIR))
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d)))
  if not steps:
    raise CheckpointError(f"{path!r} holds no checkpoint: expected a step directory (with params/ and config/), "
                          "a directory of numbered steps, or a work directory with checkpoints/.")
  return os.path.join(path, str(steps[-1]))


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(params, config)` from a native checkpoint; params are numpy arrays on the host."""
  variables, config = load_variables(path)
  return variables["params"], config


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, config)`: {"params", plus "batch_stats" etc. of a train state} as host numpy arrays."""
  import orbax.checkpoint as ocp

  step_dir = find_step_dir(path)
  item = next((i for i in ("params", "state") if os.path.isdir(os.path.join(step_dir, i))), None)
  if item is None:
    raise CheckpointError(f"{step_dir!r} has neither params/ nor state/: not a vit_jax checkpoint.")
  args = {item: ocp.args.StandardRestore()}
  has_config = os.path.isdir(os.path.join(step_dir, "config"))
  if has_config:
    args["config"] = ocp.args.JsonRestore()
  try:
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(step_dir, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"Cannot restore {step_dir!r} ({type(e).__name__}: {e}): the checkpoint is "
                          "incomplete or corrupt; use an earlier step.") from None
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
