"""The demo ViT in float32 against bfloat16 mixed precision on the digits, over seeds.

    .venv/bin/python bench/precision_digits.py --workdir workdirs/precision_digits

For each seed, `main.py` (configs/vit.py, 800 steps) three times: float32; `config.dtype=bfloat16`
(matmuls in bfloat16, parameters, optimizer state, losses, softmaxes and norm statistics in float32);
and bfloat16 with Adam's first moment stored in bfloat16 too (`config.optim.mu_dtype=bfloat16`).
Prints the test accuracy table and each bfloat16 run's difference to float32.  Every run has its own
workdir below --workdir, so a rerun only redoes what is missing.  About 6 minutes on 2 CPU cores
(bfloat16 is emulated on most CPUs: its speed here says nothing about an accelerator's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mae_digits import ROOT, run  # noqa: E402

RUNS = (("float32", []), ("bfloat16", ["--config.dtype=bfloat16"]),
        ("bfloat16, first moment bfloat16", ["--config.dtype=bfloat16", "--config.optim.mu_dtype=bfloat16"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "precision_digits"))
  parser.add_argument("--seeds", default="0,1,2")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {name: [] for name, _ in RUNS}
  for seed in seeds:
    print(f"Seed {seed}.", flush=True)
    for i, (name, flags) in enumerate(RUNS):
      metrics = run(os.path.join(args.workdir, f"run{i}_seed{seed}"), "configs/vit.py", f"--config.seed={seed}",
                    *flags)
      results[name].append(metrics["eval/accuracy"])
  print("\n| compute | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---|" + "---|" * (len(seeds) + 1))
  for name, accs in results.items():
    print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.mean(accs):.3f} |")
  base = results["float32"]
  for name, accs in list(results.items())[1:]:
    gaps = [100 * (a - b) for a, b in zip(accs, base)]
    print(f"\n{name} - float32, points: " + " / ".join(f"{g:+.1f}" for g in gaps)
          + f" (largest {max(abs(g) for g in gaps):.1f})")


if __name__ == "__main__":
  main()
