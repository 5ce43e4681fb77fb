"""Preemption-safe training checkpoints under `WORKDIR/checkpoints/<step>/`.

Each step holds three items (orbax `CheckpointManager`, asynchronous writes):

  state/   params, batch statistics, optimizer state, step and RNG (sharded arrays)
  data/    the data position (JSON: global batches read, batch size, seed), so a resumed run,
           on any number of hosts, reads the batches it would have read
  config/  the model settings and image size (JSON), which `vit_jax.checkpoint.load`
           and the convert command read

orbax writes into a temporary directory and renames it when complete (or, on
object stores, marks it complete with a commit file), so a kill mid-save leaves
the previous steps untouched.  On resume the newest step that restores is used;
an unreadable one is moved aside (`<step>.corrupt-<time>`) with a warning and the
previous one is tried.  Kept: the last `keep` steps plus every step divisible by
`keep_every`.

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
import orbax.checkpoint as ocp
from etils import epath

from vit_jax.checkpoint import CHECKPOINTS_SUBDIR
from vit_jax.train import multihost


class Checkpointer:

  def __init__(self, workdir, *, keep: int = 3, keep_every: int | None = None):
    self.directory = epath.Path(workdir) / CHECKPOINTS_SUBDIR
    multiprocessing = {}
    if jax.process_count() > 1:
      # orbax's default barrier is a device collective, which its background commit thread would run
      # while the main thread runs the next training or evaluation step: the processes can then order
      # the two differently and hang.  Naming the processes makes every orbax barrier go through the
      # coordination service instead (no device work); the root directory is then ours to create.
      multiprocessing = dict(multiprocessing_options=ocp.options.MultiprocessingOptions(
          active_processes=set(range(jax.process_count()))))
      if jax.process_index() == 0:
        self.directory.mkdir(parents=True, exist_ok=True)
      multihost.barrier("vit_jax_checkpoint_directory")
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every,
                                                 enable_async_checkpointing=True, create=not multiprocessing,
                                                 **multiprocessing)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
    """Start writing `step` (returns once the arrays are copied off the devices)."""
    # The step that computed `state` may still be running; orbax's own device work (e.g. broadcasts when it
    # lists steps) must not run beside that step's collectives, which across processes could then meet in
    # a different order on each process.
    jax.block_until_ready(state)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
        force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, data_state)` of the newest restorable step, or None when there is none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    multihost.agree(len(steps), f"the number of checkpoint steps in {self.directory}")
    multihost.agree(tuple(steps), f"the checkpoint steps in {self.directory}")
    for step in steps:
      error = None
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for damaged or partial files
        error = e
      if not multihost.any_process(error is not None):
        multihost.agree(step, "the step to resume from")
        return step, restored["state"], dict(restored["data"] or {})
      aside = self.directory / f"{step}.corrupt-{multihost.broadcast(int(time.time()))}"
      reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "failed on another process"
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); %s to %s, trying the previous one.", step,
                      self.directory, reason, "moved" if jax.process_index() == 0 else "process 0 moves it", aside)
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(aside)
      multihost.barrier(f"vit_jax_checkpoint_aside_{step}")
      self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
