"""Preemption-safe training checkpoints under `WORKDIR/checkpoints/<step>/`.

Each step holds three items (orbax `CheckpointManager`, asynchronous writes):

  state/   params, batch statistics, optimizer state, step and RNG (sharded arrays)
  data/    the input iterator's state (JSON), so a resumed run reads the same batches
  config/  the model settings and image size (JSON), which `vit_jax.checkpoint.load`
           and the convert command read

orbax writes into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous steps untouched.  On resume the newest step that
restores is used; an unreadable one is moved aside (`<step>.corrupt`) with a
warning and the previous one is tried.  Kept: the last `keep` steps plus every
step divisible by `keep_every`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orbax.checkpoint as ocp

from vit_jax.checkpoint import CHECKPOINTS_SUBDIR


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_SUBDIR))
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every,
                                                 enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any]) -> None:
    """Start writing `step` (returns once the arrays are copied off the devices)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
        force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """`(step, state, data_state)` of the newest restorable step, or None when there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["data"] or {})
      except Exception as e:  # orbax raises many types for damaged or partial files
        aside = os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}")
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); moved to %s, trying the previous "
                        "one.", step, self.directory, type(e).__name__, str(e).splitlines()[0][:200], aside)
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
