"""vit_jax.runtime: CPU flags are added once, only for known jaxlib versions, never over a user's."""

import importlib.metadata

from vit_jax import runtime


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
