"""The demo at two revisions of this repository, interleaved, on this machine, in one run.

    .venv/bin/python bench/demo_ab.py --before HEAD~1 --after WORKTREE --rounds 3
    .venv/bin/python bench/demo_ab.py --before abc123 --after HEAD -- --config.total_steps=400

Each revision is checked out into a temporary detached git worktree (WORKTREE is the files as they
are now), and `main.py` runs there with this interpreter and a fresh workdir, before and after in
turn so that the machine's load falls on both alike.  Printed per run: the process's wall time, the
training steps per second (median over the logged intervals after the first, which holds the
compilation) and the final test accuracy; then per revision the medians over the rounds, and the
ratios after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout(rev: str, into: str) -> str:
  if rev == "WORKTREE":
    return ROOT
  subprocess.run(["git", "worktree", "add", "--detach", "--quiet", into, rev], cwd=ROOT, check=True)
  return into


def run_demo(tree: str, workdir: str, extra: list[str]) -> tuple[float, float, float]:
  # The revision's package, not the installed one; a cold compilation cache for every run.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(PYTHONPATH=tree, XDG_CACHE_HOME=os.path.join(workdir, "cache"))
  t = time.perf_counter()
  done = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *extra], cwd=tree, env=env,
                        capture_output=True, text=True, timeout=3600)
  wall = time.perf_counter() - t
  if done.returncode:
    raise SystemExit(f"main.py failed in {tree}:\n{done.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  rates = [r[k] for r in rows for k in r if k.startswith("perf/") and k.endswith("_per_sec")]
  with open(os.path.join(workdir, "config.json")) as f:
    batch = json.load(f)["batch_size"]
  final = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
  return wall, statistics.median(rates[1:] or rates) / batch, final[-1] if final else float("nan")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--before", required=True, help="a git revision, or WORKTREE")
  parser.add_argument("--after", default="WORKTREE", help="a git revision, or WORKTREE (default)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("extra", nargs="*", help="flags for main.py, after --")
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix="demo_ab_")
  trees = {}
  try:
    for name in ("before", "after"):
      trees[name] = checkout(getattr(args, name), os.path.join(scratch, name))
    results = {"before": [], "after": []}
    for r in range(args.rounds):
      for name in ("before", "after"):
        wall, sps, accuracy = run_demo(trees[name], os.path.join(scratch, f"work_{name}_{r}"), args.extra)
        results[name].append((wall, sps))
        print(f"round {r} {name:6s} wall {wall:6.1f} s  {sps:6.1f} steps/s  eval/accuracy {accuracy:.4f}",
              flush=True)
  finally:
    for name, tree in trees.items():
      if tree != ROOT:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=False)
    shutil.rmtree(scratch, ignore_errors=True)
  med = {k: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for k, v in results.items()}
  print(f"\n| | revision | wall time (s) | train steps / s |\n|---|---|---|---|")
  for name in ("before", "after"):
    print(f"| {name} | {getattr(args, name)} | {med[name][0]:.1f} | {med[name][1]:.1f} |")
  print(f"| after / before | | {med['after'][0] / med['before'][0]:.2f}x | {med['after'][1] / med['before'][1]:.2f}x |")


if __name__ == "__main__":
  main()
