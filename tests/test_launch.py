"""The localhost launcher and how a process joins a job (no JAX computation here: fast)."""

import os
import subprocess
import sys
import time

import pytest

from vit_jax import launch
from vit_jax.train import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_process_gets_the_environment_of_one_host():
  env = launch.process_env(1, 3, 2, 4321, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "1")
  assert env["XLA_FLAGS"].split() == ["--foo=1", "--xla_force_host_platform_device_count=2"]
  assert env["JAX_PLATFORMS"] == "cpu"


def test_a_failing_process_takes_the_job_down_at_once():
  # Process 1 fails; process 0 would otherwise wait for a minute (as a process stuck in a collective would).
  code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)"
  tic = time.monotonic()
  job = launch.Job([sys.executable, "-c", code], 2, 1, echo=False)
  codes = job.wait(timeout=120)
  assert codes[1] == 3 and codes[0] != 0
  assert time.monotonic() - tic < 45  # not the 60 s of process 0
  assert launch.status_of(codes) in (3, 128 + 9)


def test_the_job_is_killed_at_its_timeout():
  job = launch.Job([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], 2, 1, echo=False)
  assert job.wait(timeout=3) == [124, 124]
  assert job.output(0) == "up\n"


def test_launch_command_line_runs_a_command_and_reports_its_status():
  code = "import os, sys; print(os.environ['JAX_PROCESS_ID']); sys.exit(int(os.environ['JAX_PROCESS_ID']) * 5)"
  done = subprocess.run([sys.executable, "-m", "vit_jax.launch", "--processes", "2", "--devices", "1", "--",
                         sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 5
  assert sorted(done.stdout.splitlines()) == ["[0] 0", "[1] 1"]


@pytest.mark.parametrize("args, message", [
    (dict(num_processes=2), "needs all three of --coordinator_address, --num_processes and --process_id"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), r"--process_id=2 must be in \[0, 2\)"),
])
def test_joining_a_job_needs_consistent_settings(monkeypatch, args, message):
  for k in (multihost.ENV_ADDRESS, multihost.ENV_COUNT, multihost.ENV_ID):
    monkeypatch.delenv(k, raising=False)
  with pytest.raises(ValueError, match=message):
    multihost.initialize(**args)


def test_main_reports_an_incomplete_job_on_one_line():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
  done = subprocess.run([sys.executable, "main.py", "--num_processes=2", "--workdir=/nonexistent"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith("error: A multi-process run needs all three")
