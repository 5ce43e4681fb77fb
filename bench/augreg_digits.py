"""AugReg's augmentation settings on the digits, at two training lengths.

    .venv/bin/python bench/augreg_digits.py --workdir workdirs/augreg_digits

Every run is the demo ViT of configs/vit.py (conv stem, width 64, 4 blocks, batch 64, drop path 0.1,
label smoothing 0.1) with `aug=NAME`: RandAugment (AugReg's policy; layers, magnitude) after the demo's
1-pixel random shift, and mixup at the setting's alpha.  Each setting trains for each length in `--steps`
(its own cosine schedule), and the table gives the test accuracy on the 360 test digits and the training
loss at the end (the mean of the last 5 logged, on the augmented and mixed batches), over the seeds.
Runs resume from their workdirs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mae_digits import ROOT, run  # noqa: E402  (the same subprocess runner)

sys.path.insert(0, ROOT)
from configs.vit import AUGREG  # noqa: E402


def train_loss(workdir: str, last: int = 5) -> float:
  """Mean of the last `last` logged training losses (every 50 steps; on the augmented, mixed batches)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  return statistics.mean(losses[-last:])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "augreg_digits"))
  parser.add_argument("--settings", default="none,light0,light1,medium1,medium2")
  parser.add_argument("--steps", default="800,3200", help="training lengths, comma-separated")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--override", action="append", default=[], help="extra main.py flags for every run")
  args = parser.parse_args()
  settings = args.settings.split(",")
  for name in settings:
    if name not in AUGREG:
      sys.exit(f"error: unknown setting {name!r}: choose from {list(AUGREG)}")
  lengths = [int(s) for s in args.steps.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {}
  for steps in lengths:
    for name in settings:
      for seed in seeds:
        workdir = os.path.join(args.workdir, f"{name}_{steps}_seed{seed}")
        metrics = run(workdir, f"configs/vit.py:aug={name}", f"--config.total_steps={steps}",
                      f"--config.seed={seed}", f"--config.eval_steps={steps}", f"--config.checkpoint_steps={steps}",
                      *args.override)
        results[name, steps, seed] = dict(metrics, loss=train_loss(workdir))

  print("\n| setting | RandAugment | mixup | " + " | ".join(f"{n} steps: accuracy / train loss" for n in lengths)
        + " |")
  print("|---|---|---|" + "---|" * len(lengths))
  for name in settings:
    layers_magnitude, alpha = AUGREG[name]
    cells = []
    for steps in lengths:
      accs = [results[name, steps, s]["eval/accuracy"] for s in seeds]
      loss = statistics.mean(results[name, steps, s]["loss"] for s in seeds)
      each = "" if len(seeds) == 1 else " (" + ", ".join(f"{a:.3f}" for a in accs) + ")"
      cells.append(f"{statistics.mean(accs):.3f}{each} / {loss:.3f}")
    ra = f"({layers_magnitude[0]}, {layers_magnitude[1]})" if layers_magnitude else "-"
    print(f"| {name} | {ra} | {alpha:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
