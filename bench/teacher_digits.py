"""Teacher-guided training on the bundled digits: DeiT distillation and LV-ViT token labeling.

    .venv/bin/python bench/teacher_digits.py --workdir workdirs/teacher_digits

1. Trains the teacher: the demo ViT (conv stem, configs/vit.py), 800 steps.
2. For each seed, trains the DeiT student of configs/deit.py (the same size with plain 2x2 patches and
   a distillation token; the paper's mixup / CutMix) with hard and with soft distillation from that
   teacher, and the same student without the teacher (no distillation token), all for the same number
   of steps (1200; `--deit_steps 2400` for the longer comparison).
3. Writes the teacher's dense score maps (`python -m vit_jax.data.score_maps`) and, for each seed, trains
   the small LV-ViT of configs/lvvit.py with token labeling + MixToken and the same model on the labels.

Every run is `main.py` in its own process and workdir below --workdir, so a rerun only redoes what is
missing.  Prints Markdown tables of test accuracy (360 images).  About 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mae_digits import ROOT, run  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "teacher_digits"))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--deit_steps", type=int, default=0,
                      help="train the DeiT students for this many steps instead of the config's 1200")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  teacher = os.path.join(args.workdir, "teacher")
  print("Training the teacher (the demo ViT).", flush=True)
  teacher_acc = run(teacher, "configs/vit.py")["eval/accuracy"]
  maps = os.path.join(args.workdir, "score_maps")  # beside the teacher: nothing is written into a checkpoint
  if not os.path.exists(os.path.join(maps, "meta.json")):
    subprocess.run([sys.executable, "-m", "vit_jax.data.score_maps", "--teacher", teacher, "--out", maps],
                   cwd=ROOT, check=True, capture_output=True)
    print(f"  wrote the teacher's score maps to {maps}", flush=True)

  runs = (  # (table, row, workdir tag, config)
      ("DeiT", "student + hard distillation", "deit_hard", f"configs/deit.py:teacher={teacher}"),
      ("DeiT", "student + soft distillation", "deit_soft", f"configs/deit.py:teacher={teacher},distill=soft"),
      ("DeiT", "student without the teacher", "deit_none", "configs/deit.py:distill=none"),
      ("LV-ViT", "token labeling + MixToken", "lvvit_tl", f"configs/lvvit.py:score_maps={maps}"),
      ("LV-ViT", "labels only", "lvvit_plain", "configs/lvvit.py"))
  results: dict[tuple[str, str], list[float]] = {(t, r): [] for t, r, *_ in runs}
  for seed in seeds:
    print(f"Seed {seed}.", flush=True)
    for table, row, tag, config in runs:
      overrides = [f"--config.seed={seed}"]
      if table == "DeiT" and args.deit_steps:
        tag += f"_{args.deit_steps}"
        overrides += [f"--config.{k}={args.deit_steps}" for k in ("total_steps", "eval_steps", "checkpoint_steps")]
      metrics = run(os.path.join(args.workdir, f"{tag}_seed{seed}"), config, *overrides)
      results[(table, row)].append(metrics["eval/accuracy"])

  print(f"\nTeacher (demo ViT, conv stem): test accuracy {teacher_acc:.3f}\n")
  print("| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---|" + "---|" * (len(seeds) + 1))
  for (table, row), accs in results.items():
    print(f"| {table}: {row} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.mean(accs):.3f} |")
  for kind in ("hard", "soft"):
    wins = sum(d > n for d, n in zip(results[("DeiT", f"student + {kind} distillation")],
                                     results[("DeiT", "student without the teacher")]))
    print(f"\n{kind.capitalize()} distillation beats the student without the teacher on {wins} of {len(seeds)} seeds.")


if __name__ == "__main__":
  main()
