"""Saving and resuming a training run: preemption-safe train-state checkpoints under
`WORKDIR/checkpoints/<step>/`.  (`vit_jax.checkpoint` reads the weights and config out of
the same directories for inference, conversion and fine-tuning.)

Each step holds four items (orbax `CheckpointManager`, asynchronous writes):

  state/      params, batch statistics, optimizer state, step and RNG (sharded arrays)
  data/       the data position (JSON: global batches read, batch size, seed), so a resumed run,
              on any number of hosts, reads the batches it would have read
  config/     the model settings and image size (JSON), which `vit_jax.checkpoint.load`
              and the convert command read
  checksums/  two 32-bit sums per state array (JSON, `vit_jax.checksum`), computed on the
              devices that hold the arrays when the step is saved

orbax writes into a temporary directory and renames it when complete (or, on
object stores, marks it complete with a commit file), so a kill mid-save leaves
the previous steps untouched.  Kept: the last `keep` steps plus every step
divisible by `keep_every`.

On resume two failures are told apart:
  * the step's state has other entries, shapes or dtypes than the current config
    builds (a changed setting): `CheckpointMismatchError`, naming the differences;
    nothing is touched;
  * the step is damaged (unreadable, or its arrays do not match their checksums):
    it is moved aside to `<step>.corrupt-<time>` with a warning saying where, and
    the previous step is tried.

Several processes: every process calls save and restore (orbax coordinates the
writes).  They first check that they list the same steps; if any process fails to
restore a step, all of them give it up, process 0 alone moves it aside while the
others wait, and all try the previous step; the step they resume from is checked
to be the same everywhere.  Paths are `etils.epath` paths, so `gs://` works as a
local directory does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax import checksum
from vit_jax.checkpoint import CHECKPOINTS_SUBDIR, item_metadata
from vit_jax.train import multihost


class CheckpointMismatchError(ValueError):
  """The saved state is not the state the current config builds (a setting changed since it was saved)."""


def signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{path: (shape, dtype)}` of every array leaf (arrays, ShapeDtypeStructs or orbax ArrayMetadata)."""
  return {checksum.path_name(p): (tuple(x.shape), np.dtype(x.dtype).name)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def describe_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 4) -> str:
  """'3 state entries differ: ema/... (not in the checkpoint), ...' in one line."""
  out = []
  order = lambda k: (not k.startswith("params/"), k)  # the model's own entries first: they say the most
  for k in sorted(set(saved) | set(current), key=order):
    if k not in saved:
      out.append(f"{k} (new, not in the checkpoint)")
    elif k not in current:
      out.append(f"{k} (in the checkpoint, not built now)")
    elif saved[k] != current[k]:
      (s_shape, s_dtype), (c_shape, c_dtype) = saved[k], current[k]
      what = f"shape {s_shape} saved, {c_shape} now" if s_shape != c_shape else f"dtype {s_dtype} saved, {c_dtype} now"
      out.append(f"{k} ({what})")
  if not out:
    return ""
  more = f", and {len(out) - limit} more" if len(out) > limit else ""
  return f"{len(out)} state entries differ: " + ", ".join(out[:limit]) + more


class Checkpointer:

  def __init__(self, workdir, *, keep: int = 3, keep_every: int | None = None):
    self.directory = epath.Path(workdir) / CHECKPOINTS_SUBDIR
    multiprocessing = {}
    if jax.process_count() > 1:
      # orbax's default barrier is a device collective, which its background commit thread would run
      # while the main thread runs the next training or evaluation step: the processes can then order
      # the two differently and hang.  Naming the processes makes every orbax barrier go through the
      # coordination service instead (no device work).
      multiprocessing = dict(multiprocessing_options=ocp.options.MultiprocessingOptions(
          active_processes=set(range(jax.process_count()))))
    # Nothing is created before the first save: a run that fails at start leaves no trace.
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every,
                                                 enable_async_checkpointing=True, create=False, **multiprocessing)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._created = False

  def _create_directory(self) -> None:
    if not self._created:
      if jax.process_index() == 0:
        self.directory.mkdir(parents=True, exist_ok=True)
      multihost.barrier("vit_jax_checkpoint_directory")
      self._created = True

  def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
    """Start writing `step` (returns once the arrays are copied off the devices)."""
    # The step that computed `state` may still be running; orbax's own device work (e.g. broadcasts when it
    # lists steps) must not run beside that step's collectives, which across processes could then meet in
    # a different order on each process.
    jax.block_until_ready(state)
    sums = checksum.tree_checksums(state)  # where the arrays are, before they leave the devices
    self._create_directory()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
        checksums=ocp.args.JsonSave(sums)), force=True)

  def _saved_signature(self, step: int) -> dict[str, Any]:
    # Through the manager's directory, as orbax itself reaches it.
    return signature(item_metadata(epath.Path(self.manager.directory) / str(step) / "state"))

  def restore_latest(self, abstract_state: Any, *, changes: str = "") -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, data_state)` of the newest intact step, or None when there is none.

    Raises `CheckpointMismatchError` (touching nothing) when a step's state does not have the
    entries, shapes and dtypes of `abstract_state`; `changes` (the config differences since the
    saved run) is added to its message.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    multihost.agree(len(steps), f"the number of checkpoint steps in {self.directory}")
    multihost.agree(tuple(steps), f"the checkpoint steps in {self.directory}")
    current = signature(abstract_state)
    for step in steps:
      error = None
      try:
        differences = describe_differences(self._saved_signature(step), current)
      except Exception as e:  # unreadable metadata: the step is damaged
        error, differences = e, ""
      if multihost.any_process(bool(differences)):
        where = self.directory / str(step)
        raise CheckpointMismatchError(
            f"{where} was saved with other settings ({'config changes: ' + changes + '; ' if changes else ''}"
            f"{differences or 'a difference on another process'}); nothing was changed. Resume with the saved "
            f"config ({self.directory.parent / 'config.json'}), use a new --workdir, or start a new run from these "
            f"weights with --config.init.path={where} and a new --workdir.")
      if error is None:
        try:
          items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
          has_sums = (self.directory / str(step) / "checksums").exists()
          if has_sums:
            items["checksums"] = ocp.args.JsonRestore()
          restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged or partial files
          error = e
      if not multihost.any_process(error is not None) and has_sums:
        bad = checksum.mismatches(restored["checksums"] or {}, restored["state"])  # on the devices, all processes
        if bad:
          error = ValueError(f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:3])}")
      if not multihost.any_process(error is not None):
        multihost.agree(step, "the step to resume from")
        return step, restored["state"], dict(restored["data"] or {})
      self._set_aside(step, error)
    return None

  def _set_aside(self, step: int, error: Exception | None) -> None:
    aside = self.directory / f"{step}.corrupt-{multihost.broadcast(int(time.time()))}"
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "failed on another process"
    logging.warning("Checkpoint step %d in %s is damaged (%s); %s to %s, trying the previous one.", step,
                    self.directory, reason, "moved" if jax.process_index() == 0 else "process 0 moves it", aside)
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    multihost.barrier(f"vit_jax_checkpoint_aside_{step}")
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
