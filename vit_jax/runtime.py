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
