"""vit_jax.runtime: CPU flags are added once, only for known jaxlib versions, never over a user's; the
persistent compilation cache serves a second start, and a user's own cache directory is kept."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from vit_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.total_steps=3", "--config.log_steps=3", "--config.eval_steps=3", "--config.checkpoint_steps=3",
        "--config.batch_size=16", "--config.eval_batch_size=120", "--config.model.depth=1"]


def test_tune_xla_cpu_adds_flags_once_and_respects_user_settings(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert runtime.tune_xla_cpu(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
  assert not runtime.tune_xla_cpu(env)  # idempotent
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert not runtime.tune_xla_cpu(user) and user["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_unknown_jaxlib_versions_get_no_flags(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
  env = {}
  assert not runtime.tune_xla_cpu(env) and "XLA_FLAGS" not in env


def start(workdir, env, *flags):
  done = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *TINY, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]


def entries(path):
  return {name for name in os.listdir(path) if name.endswith("-cache")} if os.path.isdir(path) else set()


@pytest.mark.slow
def test_a_second_start_loads_every_program_from_the_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["XDG_CACHE_HOME"] = str(tmp_path / "user")
  start(tmp_path / "a", env)  # the default: the user's cache
  first = entries(tmp_path / "user" / "vit_jax" / "xla")
  assert len(first) >= 3  # init, train step, evaluation (and the small programs around them)
  start(tmp_path / "b", env)  # the same run again: nothing new to compile
  assert entries(tmp_path / "user" / "vit_jax" / "xla") == first
  # Off by config; a directory the user chose is kept.
  start(tmp_path / "c", env, "--config.compilation_cache=")
  start(tmp_path / "d", dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine")),
        f"--config.compilation_cache={tmp_path / 'ignored'}")
  assert entries(tmp_path / "user" / "vit_jax" / "xla") == first
  assert entries(tmp_path / "mine") and not os.path.exists(tmp_path / "ignored")
