"""CPVT's position encoding generator against a learned table when the input grows: the digits.

    .venv/bin/python bench/peg_resolution.py --workdir workdirs/peg_resolution

For each seed, trains the demo ViT of configs/vit.py (conv stem, 2x2 patches: a 4x4 grid at 8 px, 800
steps) twice through `main.py`: with its learned position table, and with `posemb=peg` (no table; a
depthwise 3x3 convolution after the first block).  Then evaluates both on the 360 test digits at the
trained 8 px and at 12 and 16 px (6x6 and 8x8 grids) two ways: the digit in the middle of a larger
canvas (`central_pad`: the same strokes, more positions) and the digit upsampled (bilinear `resize`:
larger strokes as well).  The PEG model runs as it is; the learned table is resized to the new grid
with `resize_posemb` (bilinear, vit_jax's mode).  Prints a Markdown table of test accuracy.  About 10
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mae_digits import run  # noqa: E402

SIZES = (8, 12, 16)
WAYS = {"canvas": "central_pad", "upsampled": "resize"}
COLUMNS = [(8, "canvas")] + [(size, way) for way in WAYS for size in SIZES[1:]]


def accuracy(workdir: str, size: int, way: str = "canvas") -> float:
  """Test accuracy of the run's final checkpoint on the digits at `size` px: on a larger canvas, or upsampled."""
  import jax
  import numpy as np

  from vit_jax import checkpoint
  from vit_jax.data import input_pipeline
  from vit_jax.interop import resize_posemb
  from vit_jax.models.vit import VisionTransformer

  variables, saved = checkpoint.load_variables(workdir)
  settings = saved["model"]
  model = VisionTransformer(**settings)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  grid = (size // 2, size // 2)  # the conv stem and the patch projection: stride 2 in all
  if settings.get("posemb", "learn") == "learn":
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    prefix = table.shape[1] - (8 // 2) ** 2
    params["Transformer"]["posembed_input"]["pos_embedding"] = resize_posemb(table, grid, num_prefix_tokens=prefix)
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  source = input_pipeline.get_source("digits", "test")
  correct = count = 0.0
  pp = f"decode|{WAYS[way]}({size})|value_range(-1, 1)"
  for batch in input_pipeline.eval_batches(source, pp, 120):
    logits = np.asarray(apply({**variables, "params": params}, batch["image"]))
    correct += float(np.sum((logits.argmax(-1) == batch["label"]) * batch["mask"]))
    count += float(np.sum(batch["mask"]))
  return correct / count


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join("workdirs", "peg_resolution"))
  parser.add_argument("--seeds", default="0,1,2")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  models = {"learned table (resized)": "learn", "PEG (as trained)": "peg"}
  results = {(name, column): [] for name in models for column in COLUMNS}
  for seed in seeds:
    for name, posemb in models.items():
      workdir = os.path.abspath(os.path.join(args.workdir, f"{posemb}_seed{seed}"))
      run(workdir, "configs/vit.py", f"--config.seed={seed}", f"--config.model.posemb={posemb}")
      for column in COLUMNS:
        results[(name, column)].append(accuracy(workdir, *column))
      print(f"  seed {seed}, {name}: " + ", ".join(f"{s} px {w} {results[(name, (s, w))][-1]:.3f}"
                                                   for s, w in COLUMNS), flush=True)

  print("\nTest accuracy on the digits, trained at 8 px (mean over seeds " + ", ".join(map(str, seeds)) + "; "
        "per seed in brackets):\n")
  print("| position encoding | " + " | ".join(f"{s} px{'' if s == 8 else ', ' + w} ({s // 2}x{s // 2})"
                                             for s, w in COLUMNS) + " |")
  print("|---|" + "---|" * len(COLUMNS))
  for name in models:
    cells = [f"{statistics.mean(results[(name, c)]):.3f} ({' / '.join(f'{a:.3f}' for a in results[(name, c)])})"
             for c in COLUMNS]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
