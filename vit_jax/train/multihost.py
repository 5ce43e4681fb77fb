"""Many processes, one program: joining the job, agreeing on decisions, preemption notices.

Every host of a TPU pod slice or a multi-node GPU job runs the same command; the
processes join through `jax.distributed.initialize` and from then on see one
global set of devices.  Host-side code must then take the *same* control-flow
decisions on every process (which step to resume, when to stop), or the
processes call different collectives and hang.  The helpers here make each
such decision once (process 0, or all processes together) and check it.

How the job is joined (`initialize`):
  * explicit: coordinator address, process count and process id (flags, or the
    environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  * auto-detected: `jax.distributed.initialize()` with no arguments, which reads
    Cloud TPU metadata, SLURM, Open MPI or Kubernetes.
On CPU the collectives between processes use gloo.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, timeout_s: int = 300) -> bool:
  """Join the multi-process job; True if `jax.distributed` was initialized.

  Arguments left None are read from the environment (ENV_ADDRESS / ENV_COUNT /
  ENV_ID).  With none of them and `auto=False` this is a single-process run and
  nothing happens.  Must run before anything touches a JAX device.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_ADDRESS) or None
  if num_processes is None and env.get(ENV_COUNT):
    num_processes = int(env[ENV_COUNT])
  if process_id is None and env.get(ENV_ID):
    process_id = int(env[ENV_ID])
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("A multi-process run needs all three of --coordinator_address, --num_processes and "
                       f"--process_id (or {ENV_ADDRESS}, {ENV_COUNT}, {ENV_ID}); got "
                       f"{dict(zip(('address', 'processes', 'id'), explicit))}. Or pass --distributed alone "
                       "to detect them (Cloud TPU, SLURM, Open MPI, Kubernetes).")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    if _backend_started():
      raise RuntimeError("JAX already started its backend: initialize before any JAX computation.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s)
    return True
  if auto:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False


def _backend_started() -> bool:
  from vit_jax import runtime
  return runtime._backend_started()


def is_distributed() -> bool:
  return jax.distributed.is_initialized()


def agree(value: Any, what: str) -> Any:
  """`value` if every process holds the same one; else a RuntimeError that lists them all.

  `value`: an int, or a flat tuple of ints.  Decisions that change control flow
  go through this, so that a disagreement fails loudly instead of hanging.
  """
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  local = np.asarray(value, np.int64).reshape(-1)
  everyone = np.asarray(multihost_utils.process_allgather(local))  # [processes, len]
  if not (everyone == everyone[:1]).all():
    raise RuntimeError(f"The processes disagree on {what}: {[tuple(int(x) for x in row) for row in everyone]} "
                       "(process 0 first). Check that every host sees the same work directory and files.")
  return value


def broadcast(value: Any) -> Any:
  """Process 0's `value` (an int or a flat tuple of ints) on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  out = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))
  return int(out) if out.ndim == 0 else tuple(int(x) for x in out)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier `name` (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """Whole numpy copies of (possibly sharded over processes) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(get, tree)


def from_host(tree: Any, shardings: Any) -> Any:
  """Place host arrays (the same values on every process) with `shardings` (a tree like `tree`, or one
  sharding for all); each process puts only its own shards."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
  return jax.tree_util.tree_map(put, tree, shardings)


class PreemptionWatch:
  """Has a preemption notice (SIGTERM) reached this job?  Asked at every step boundary.

  Several processes: JAX's preemption sync point (the coordination service
  relays a notice that reaches any host, and every process answers True at the
  same step).  One process without it: a SIGTERM handler that sets a flag.
  """

  def __init__(self):
    self._flag = False
    self._sync = False
    self._previous = None
    if is_distributed():
      from jax._src import distributed as jax_distributed  # the manager exists once initialize ran
      self._sync = getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
    if not self._sync:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      except ValueError:  # not the main thread (e.g. a notebook worker): no notice can be caught
        self._previous = None

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, step: int, in_flight: Any = None) -> bool:
    """True (on every process together) when the run must save at `step` and stop.

    `in_flight`: arrays of the step still computing.  Without the sync service, several processes
    compare their flags with a device collective, which must not run alongside that step's own
    collectives (across processes they could meet in different orders): it waits for them first.
    """
    if self._sync:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      jax.block_until_ready(in_flight)
    return any_process(self._flag)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

