"""QK normalisation (ViT-22B) against the plain ViT at learning rates where the plain one degrades.

    .venv/bin/python bench/qk_norm_stability.py --workdir workdirs/qk_norm

For each learning rate and seed, trains the demo ViT of configs/vit.py (800 steps, AdamW, warmup 25,
cosine, gradient clipping at 1) twice through `main.py`: as it is, and with `--config.model.qk_norm=
layernorm` (LayerNorm over each head's queries and keys before the dot product).  Prints a Markdown
table of the final training loss (the last logged value) and the test accuracy, per seed and as the
mean; a run whose loss becomes non-finite is reported as diverged at the step the trainer stopped.
About 12 minutes on 2 CPU cores with the default two learning rates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, lr: float, seed: int, qk_norm: bool) -> dict:
  """`main.py` with the demo config; {"loss", "accuracy"} or {"diverged": step}."""
  flags = [f"--config.optim.lr={lr}", f"--config.seed={seed}"] + (["--config.model.qk_norm=layernorm"] if qk_norm
                                                                  else [])
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  rows = []
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  final = re.search(r"^final: .*eval/accuracy ([0-9.]+)", proc.stdout, re.M)
  if proc.returncode or not final:
    stopped = re.search(r"The training loss is \S+ at step (\d+)", proc.stdout + proc.stderr)
    if stopped:
      return {"diverged": int(stopped.group(1))}
    sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
  return {"loss": losses[-1][1], "accuracy": float(final.group(1))}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "qk_norm"))
  parser.add_argument("--lrs", default="0.002,0.03", help="learning rates (the demo's is 0.002)")
  parser.add_argument("--seeds", default="0,1,2")
  args = parser.parse_args()
  lrs = [float(v) for v in args.lrs.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {}
  for lr in lrs:
    for qk in (False, True):
      for seed in seeds:
        tag = f"lr{lr:g}_{'qknorm' if qk else 'plain'}_seed{seed}"
        results[lr, qk, seed] = r = train(os.path.abspath(os.path.join(args.workdir, tag)), lr, seed, qk)
        print(f"  {tag}: {r}", flush=True)

  show = lambda r: f"diverged at step {r['diverged']}" if "diverged" in r else f"{r['loss']:.3f} / {r['accuracy']:.3f}"
  print("\nFinal training loss / test accuracy on the digits, 800 steps:\n")
  print("| lr | model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---|---|" + "---|" * (len(seeds) + 1))
  for lr in lrs:
    for qk in (False, True):
      runs = [results[lr, qk, s] for s in seeds]
      done = [r for r in runs if "diverged" not in r]
      mean = (f"{statistics.mean(r['loss'] for r in done):.3f} / {statistics.mean(r['accuracy'] for r in done):.3f}"
              if len(done) == len(runs) else f"{len(runs) - len(done)} of {len(runs)} diverged")
      print(f"| {lr:g} | {'QK-norm' if qk else 'plain'} | " + " | ".join(show(r) for r in runs) + f" | {mean} |")


if __name__ == "__main__":
  main()
