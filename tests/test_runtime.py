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
  return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *TINY, *flags], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*runs):
  for run in runs:
    try:
      err = run.communicate(timeout=300)[1]
    finally:
      run.kill()
    assert run.returncode == 0, err[-2000:]


def entries(path):
  return {name for name in os.listdir(path) if name.endswith("-cache")} if os.path.isdir(path) else set()


@pytest.mark.slow
def test_a_second_start_loads_every_program_from_the_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  user = tmp_path / "user" / "vit_jax" / "xla"
  finish(start(tmp_path / "a", dict(env, XDG_CACHE_HOME=str(tmp_path / "user"))))  # the default: the user's cache
  first = entries(user)
  assert len(first) >= 3  # init, train step, evaluation (and the small programs around them)
  finish(start(tmp_path / "b", dict(env, XDG_CACHE_HOME=str(tmp_path / "user"))),  # again: nothing to compile
         start(tmp_path / "c", dict(env, XDG_CACHE_HOME=str(tmp_path / "other")), "--config.compilation_cache="))
  assert entries(user) == first
  assert not os.path.exists(tmp_path / "other")  # off: nothing written


def test_a_cache_directory_the_user_chose_is_kept(tmp_path):
  import jax
  chosen = jax.config.jax_compilation_cache_dir  # this test session's, from JAX_COMPILATION_CACHE_DIR
  assert chosen
  assert runtime.compilation_cache(str(tmp_path / "elsewhere"), str(tmp_path)) == chosen
  assert runtime.compilation_cache("workdir", str(tmp_path)) == chosen
  assert not os.listdir(tmp_path)  # nothing created for the settings that were not used
