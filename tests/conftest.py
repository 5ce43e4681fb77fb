"""Test setup: CPU, 8 simulated devices (unless already set), the CPU runtime flags, exact float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from vit_jax import runtime  # noqa: E402

runtime.tune_xla_cpu()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
