"""Test setup: CPU, 8 simulated devices (unless already set), the CPU runtime flags, exact float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Every process of the session (pytest's workers, the runs they start) shares one compilation cache in a
# temporary directory: programs compiled once load in the next process, and nothing lands in the user's
# cache.  Size-limited, so that JAX guards the directory with a file lock between processes.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit_jax_tests_xla_")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 ** 31))

from vit_jax import runtime  # noqa: E402

runtime.tune_xla_cpu()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session):
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):  # the main process, once every worker is done
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
