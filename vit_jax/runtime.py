"""Process-level runtime settings that must be chosen before JAX starts its backends.

On CPU, XLA 0.10's YNNPACK fusions slow the ViT-Ti train step down on the 2-core
AVX-512 machine this project is measured on (`bench/vit_step.py` against
`bench/vit_step.py --xla-default-flags`).  `tune_xla_cpu()` turns them off.  It only
adds the flag for jaxlib versions known to accept it (an unknown XLA flag aborts
the process), never overrides a user's own setting, and does nothing once a JAX
backend is running.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

# Flags measured on the pinned jaxlib; XLA aborts on flags it does not know.
_CPU_FLAGS = {"0.10.2": ("--xla_cpu_experimental_ynn_fusion_type=",)}


def _backend_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb is not None and getattr(xb, "_backends", None))


def tune_xla_cpu(env: dict[str, str] | None = None) -> bool:
  """Add the CPU performance flags to `XLA_FLAGS` (or `env`); True if anything was added."""
  env = os.environ if env is None else env
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  flags = _CPU_FLAGS.get(version.split("+")[0], ())
  current = env.get("XLA_FLAGS", "")
  missing = [f for f in flags if f.split("=")[0] not in current]
  if not missing or (env is os.environ and _backend_started()):
    return False
  env["XLA_FLAGS"] = " ".join([current, *missing]).strip()
  return True


COMPILE_CACHE_MAX_BYTES = 4 * 2 ** 30  # least recently used programs are evicted beyond this


def compilation_cache(setting: str | None, workdir: str | None = None) -> str | None:
  """Turn on JAX's persistent compilation cache, so that a second start of a run (a resumed job, the
  same config again, another process on this host) loads its programs instead of compiling them.

  `setting`: "user" ($XDG_CACHE_HOME/vit_jax/xla, else ~/.cache/vit_jax/xla), "workdir"
  (WORKDIR/xla_cache, shared by the hosts of a job), any other path, or "" / "off" for none.  A cache
  directory the user already chose (JAX_COMPILATION_CACHE_DIR or jax.config) is kept.  Every program
  is cached, however quickly it compiled; processes on one host share the cache under a file lock.
  Returns the directory in use, or None.
  """
  import jax

  chosen = jax.config.jax_compilation_cache_dir
  if chosen:
    return chosen
  if not setting or setting == "off":
    return None
  if setting == "user":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "vit_jax", "xla")
  elif setting == "workdir":
    if not workdir:
      raise ValueError("config.compilation_cache='workdir' needs a workdir: give --workdir or choose 'user'.")
    path = os.path.join(str(workdir), "xla_cache")
  else:
    path = os.path.expanduser(setting)
  if "://" not in path:
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if "://" not in path:  # eviction (and the file lock that comes with it) on local disks
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
  return path
