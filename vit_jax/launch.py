"""Run a multi-host job on one machine: N processes, each with K simulated CPU devices.

    python -m vit_jax.launch --processes 2 --devices 2 -- main.py --workdir workdirs/mh
    python -m vit_jax.launch --processes 1 --devices 4 -- main.py --workdir workdirs/one

Each process gets the environment of one host of a real job (JAX_COORDINATOR_ADDRESS
on 127.0.0.1, JAX_NUM_PROCESSES, JAX_PROCESS_ID, `--xla_force_host_platform_device_count=K`,
gloo collectives), so `main.py` joins the job through `jax.distributed.initialize`
exactly as it would on a TPU pod slice; `--processes 1` runs the same code path.
Output lines are prefixed with the process index.  When one process fails the
others are killed (a process waiting in a collective would otherwise hang), and the
whole job is killed after `--timeout` seconds.  SIGTERM sent to the launcher is passed
to every process (a preemption notice); `--sigterm-process I` sends it to process I only.

Exit status: 0 when every process succeeded, else the first failure's status
(124 for a timeout).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, processes: int, devices: int, port: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process `process_id` of a localhost job."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
  env.update(XLA_FLAGS=" ".join([*flags, f"{DEVICE_FLAG}={devices}"]), JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(process_id), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1")
  return env


class Job:
  """N processes of `command`; `wait()` returns their exit statuses."""

  def __init__(self, command: Sequence[str], processes: int, devices: int, *, cwd: str | None = None,
               env: dict[str, str] | None = None, echo: bool = True):
    if processes < 1 or devices < 1:
      raise ValueError(f"Need at least one process and one device each, got {processes} x {devices}.")
    command = list(command)
    if command and command[0].endswith(".py"):
      command = [sys.executable, *command]
    self.port = free_port()
    self.outputs: list[list[str]] = [[] for _ in range(processes)]
    self.procs = [subprocess.Popen(command, cwd=cwd, env=process_env(i, processes, devices, self.port, env),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # its own group: kill its children too
                  for i in range(processes)]
    self._readers = [threading.Thread(target=self._read, args=(i, echo), daemon=True) for i in range(processes)]
    for t in self._readers:
      t.start()

  def _read(self, i: int, echo: bool) -> None:
    for line in self.procs[i].stdout:
      self.outputs[i].append(line)
      if echo:
        sys.stdout.write(f"[{i}] {line}")
        sys.stdout.flush()

  def signal(self, signum: int, process_id: int | None = None) -> None:
    for i, p in enumerate(self.procs):
      if (process_id is None or i == process_id) and p.poll() is None:
        try:
          os.killpg(p.pid, signum)
        except ProcessLookupError:
          pass

  def kill(self) -> None:
    self.signal(signal.SIGKILL)

  def output(self, i: int) -> str:
    return "".join(self.outputs[i])

  def wait(self, timeout: float | None = None) -> list[int]:
    """Exit statuses; a failure kills the other processes; past `timeout` all are killed (status 124)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
      while None in [p.poll() for p in self.procs]:  # a list: poll every process, not just up to the first alive
        failed = [p.returncode for p in self.procs if p.returncode not in (None, 0)]
        if failed or (deadline is not None and time.monotonic() > deadline):
          # Give the others a moment to fail on their own (their errors are more telling), then kill.
          grace = time.monotonic() + (5 if failed else 0)
          while None in [p.poll() for p in self.procs] and time.monotonic() < grace:
            time.sleep(0.1)
          timed_out = not failed
          self.kill()
          for p in self.procs:
            p.wait()
          if timed_out:
            return [124 if p.returncode < 0 else p.returncode for p in self.procs]
          break
        time.sleep(0.05)
    except BaseException:
      self.kill()
      raise
    finally:
      for t in self._readers:
        t.join(timeout=5)
    return [p.returncode for p in self.procs]


def status_of(codes: Sequence[int]) -> int:
  """One exit status for the job: 0 if all succeeded, else the first failure (signals as 128 + n)."""
  for c in codes:
    if c:
      return 128 - c if c < 0 else c
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="processes (simulated hosts)")
  parser.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
  parser.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
  parser.add_argument("--sigterm-after", type=float, default=None,
                      help="send SIGTERM (a preemption notice) after this many seconds")
  parser.add_argument("--sigterm-process", type=int, default=None,
                      help="with --sigterm-after: only to this process (default: all)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. main.py --workdir DIR")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command: put it after --, e.g. -- main.py --workdir DIR")
  job = Job(command, args.processes, args.devices)
  signal.signal(signal.SIGTERM, lambda *_: job.signal(signal.SIGTERM))
  if args.sigterm_after is not None:
    timer = threading.Timer(args.sigterm_after, job.signal, (signal.SIGTERM, args.sigterm_process))
    timer.daemon = True
    timer.start()
  return status_of(job.wait(args.timeout))


if __name__ == "__main__":
  sys.exit(main())
