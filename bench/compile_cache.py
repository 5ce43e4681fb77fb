"""A run's first start against its second start with the persistent compilation cache, on this machine.

    .venv/bin/python bench/compile_cache.py                      # the demo, 20 steps
    .venv/bin/python bench/compile_cache.py -- --config configs/swin.py

Each start is `main.py` in its own process and a new workdir; the cache is a fresh directory that the
first start fills and the second reads (`config.compilation_cache`).  A third start runs with the
cache off.  For each: the process's wall time, the seconds XLA spent compiling (or loading compiled
programs: JAX's backend-compile events), the seconds spent tracing and lowering (never cached), and
the cache hits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import collections, json, sys
import jax.monitoring
durations, events = collections.Counter(), collections.Counter()
jax.monitoring.register_event_duration_secs_listener(lambda e, s, **kw: durations.update({e: s}))
jax.monitoring.register_event_listener(lambda e, **kw: events.update({e: 1}))
sys.argv = ["main.py"] + sys.argv[1:]
sys.path.insert(0, ".")
import main
from absl import app
try:
  app.run(main.main, flags_parser=main.parse_flags)
finally:
  print("BENCH " + json.dumps({"durations": durations, "events": events}), flush=True)
"""


def start(workdir: str, cache: str, extra: list[str]) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  t = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", CHILD, f"--workdir={workdir}", f"--config.compilation_cache={cache}",
                         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
  wall = time.perf_counter() - t
  lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
  if done.returncode or not lines:
    raise SystemExit(f"main.py failed:\n{done.stderr[-3000:]}")
  record = json.loads(lines[-1][len("BENCH "):])
  d = record["durations"]
  return {"wall": wall, "compile": d.get("/jax/core/compile/backend_compile_duration", 0.0),
          "trace": d.get("/jax/core/compile/jaxpr_trace_duration", 0.0)
          + d.get("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.0),
          "hits": record["events"].get("/jax/compilation_cache/cache_hits", 0)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("extra", nargs="*", help="flags for main.py, after --")
  args = parser.parse_args()
  extra = args.extra or ["--config.total_steps=20", "--config.eval_steps=20", "--config.checkpoint_steps=20"]
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    rows = [("first start (cache empty)", start(os.path.join(tmp, "a"), cache, extra)),
            ("second start (cache filled)", start(os.path.join(tmp, "b"), cache, extra)),
            ("cache off", start(os.path.join(tmp, "c"), "", extra))]
  print(f"# main.py {' '.join(extra)}")
  print("| start | wall time (s) | XLA compile (s) | tracing + lowering (s) | cache hits |")
  print("|---|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['wall']:.1f} | {r['compile']:.2f} | {r['trace']:.2f} | {r['hits']} |")
  first, second = rows[0][1], rows[1][1]
  print(f"\nXLA compile time, first / second start: {first['compile'] / max(second['compile'], 1e-9):.1f}x; "
        f"wall time: {first['wall'] / second['wall']:.2f}x")


if __name__ == "__main__":
  main()
