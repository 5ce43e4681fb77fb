"""Pixels as tokens: the plain ViT on the digits at patch sizes 4, 2 and 1 (4, 16 and 64 tokens).

    .venv/bin/python bench/pixels_as_tokens.py --workdir workdirs/pixels_as_tokens

Every run is the digits ViT of configs/vit.py (width 64, 4 blocks, global average pooling, 800
steps at batch 64) with the plain patch stem (one linear projection of each p x p patch) instead of
the demo's conv stem, so the patch size alone sets the number of tokens.  For each patch size and
seed it reports the test accuracy, and the step cost: the median training throughput of the run's
progress lines after the first (compilation excluded), as milliseconds per step of 64 images, on
this machine.  Prints a Markdown table.  Runs resume from their workdirs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mae_digits import ROOT, run  # noqa: E402  (the same subprocess runner)


def step_ms(workdir: str, batch: int) -> float:
  """Median milliseconds per training step from the logged throughput, the first log left out."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [r["perf/img_per_sec"] for r in map(json.loads, f) if "perf/img_per_sec" in r]
  if len(rates) < 2:
    raise SystemExit(f"error: {workdir} logged {len(rates)} throughputs; give it more steps.")
  return 1000.0 * batch / statistics.median(rates[1:])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "pixels_as_tokens"))
  parser.add_argument("--patches", default="4,2,1")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--override", action="append", default=[], help="extra main.py flags for every run")
  args = parser.parse_args()
  patches = [int(p) for p in args.patches.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for p in patches:
    accs, costs = [], []
    for seed in seeds:
      workdir = os.path.join(args.workdir, f"patch{p}_seed{seed}")
      metrics = run(workdir, "configs/vit.py", "--config.model.stem=patch", f"--config.model.patch_size={p}",
                    f"--config.seed={seed}", *args.override)
      accs.append(metrics["eval/accuracy"])
      with open(os.path.join(workdir, "config.json")) as f:
        batch = json.load(f)["batch_size"]
      costs.append(step_ms(workdir, batch))
    rows.append((p, (8 // p) ** 2, accs, statistics.median(costs)))

  base = rows[0][3]
  print("\n| patch | tokens | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | ms / step | cost |")
  print("|---|---|" + "---|" * (len(seeds) + 3))
  for p, tokens, accs, ms in rows:
    print(f"| {p}x{p} | {tokens} | " + " | ".join(f"{a:.3f}" for a in accs)
          + f" | {statistics.mean(accs):.3f} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
  main()
