"""Image GPT on the bundled digits: bits per dimension, linear probes per layer, and fine-tuning with 10%
of the labels against training from scratch (the MAE comparison of bench/mae_digits.py).

    .venv/bin/python bench/igpt_digits.py --workdir workdirs/igpt_digits_10pct

1. Pre-trains configs/igpt.py (next-pixel likelihood over the 17 grey levels) on every training image,
   without labels; prints the evaluation bits per dimension by step.
2. Linear probes as in the paper: every layer's features (the block input through the block's first
   norm, averaged over the 64 positions; the final norm's output for the last), standardised, and an
   L2-regularised logistic regression whose strength is picked by cross-validation on the training
   labels (scikit-learn); with all 1437 training labels and with the first 10%.
3. For each seed, fine-tunes the pre-trained model as a classifier on the first 10% of the training
   split (144 images; configs/igpt.py:mode=finetune) and trains the same classifier from scratch on
   the same images with the same recipe; accuracy on the 360 test images.

Every training run is `main.py` in its own process and workdir below --workdir, so a rerun resumes
finished runs instantly.  Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mae_digits import ROOT, eval_curve, run  # noqa: E402  (the same subprocess runner)


def probe_features(workdir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """`[depth + 1, N, width]` features of every image of `split`, and the labels."""
  import json

  import jax

  from vit_jax import checkpoint
  from vit_jax.data import input_pipeline
  from vit_jax.models import igpt
  from vit_jax.train.tasks import load_palette

  params, saved = checkpoint.load(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  colours = load_palette(config.get("palette") or "grey:17")
  model = igpt.ImageGPT(**{k: v for k, v in saved["model"].items() if k not in ("channels", "family")})
  fn = jax.jit(lambda p, ids: igpt.probe_features(
      p, model.apply({"params": p}, igpt.sos_shift(ids, model.vocab_size), features=True)[1]))
  data = config["data"]
  source = input_pipeline.get_source(data["name"], split, data.get("data_dir"), channels=int(colours.shape[1]))
  feats, labels = [], []
  for batch in input_pipeline.eval_batches(source, data["pp_eval"], 256):
    n = int(batch["mask"].sum())
    ids = igpt.quantize(batch["image"][:n], colours)
    feats.append(np.asarray(fn(params, ids)))
    labels.append(np.asarray(batch["label"][:n]))
  return np.concatenate(feats, axis=1), np.concatenate(labels)


def probe(train_x, train_y, test_x, test_y, folds: int) -> float:
  """Test accuracy of a standardised, cross-validated L2 logistic regression."""
  from sklearn.linear_model import LogisticRegressionCV
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-3, 2, 6), cv=folds, max_iter=3000))
  with warnings.catch_warnings():  # scikit-learn's notices of future defaults
    warnings.simplefilter("ignore", FutureWarning)
    clf.fit(train_x, train_y)
  return float(clf.score(test_x, test_y))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "igpt_digits_10pct"))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--split", default="train[:10%]", help="the labelled training images")
  parser.add_argument("--pretrain_steps", type=int, default=None, help="default: configs/igpt.py's")
  parser.add_argument("--finetune_override", action="append", default=[],
                      help="extra main.py flags for both classifier runs (pre-trained and scratch)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.workdir, exist_ok=True)

  pre_dir = os.path.join(args.workdir, "pretrain")
  pre = [f"--config.total_steps={args.pretrain_steps}",
         f"--config.eval_steps={max(1, args.pretrain_steps // 4)}"] if args.pretrain_steps else []
  print("Pre-training Image GPT on every training image (no labels).", flush=True)
  final = run(pre_dir, "configs/igpt.py", *pre)
  curve = eval_curve(pre_dir, "eval/bits_per_dim")

  print("Linear probes on every layer.", flush=True)
  train_f, train_y = probe_features(pre_dir, "train")
  test_f, test_y = probe_features(pre_dir, "test")
  few = int(round(len(train_y) * 0.1))  # the first 10% of the training split, as train[:10%]
  probes = [(probe(train_f[l], train_y, test_f[l], test_y, 5), probe(train_f[l, :few], train_y[:few], test_f[l], test_y, 3))
            for l in range(len(train_f))]

  runs = (("Image GPT fine-tuned", "igpt_ft", pre_dir), ("from scratch (same recipe)", "scratch", ""))
  results: dict[str, list[float]] = {row: [] for row, *_ in runs}
  for seed in seeds:
    print(f"Seed {seed}: fine-tuning on {args.split} from the pre-trained model and from scratch.", flush=True)
    for row, tag, init in runs:
      config = f"configs/igpt.py:mode=finetune,init={init},split={args.split}"
      metrics = run(os.path.join(args.workdir, f"{tag}_seed{seed}"), config, f"--config.seed={seed}",
                    *args.finetune_override)
      results[row].append(metrics["eval/accuracy"])

  print(f"\nPre-training: test bits per dimension by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in curve)
        + f" (final {final['eval/bits_per_dim']:.4f}; uniform over 17 levels: {np.log2(17):.4f})")
  depth = len(probes) - 1
  print(f"\nLinear probes (test accuracy on the 360 digits; layer l = block l's input, {depth} = final norm):\n")
  print("| layer | " + " | ".join(str(l) for l in range(depth + 1)) + " |")
  print("|---|" + "---|" * (depth + 1))
  print("| all 1437 labels | " + " | ".join(f"{a:.3f}" for a, _ in probes) + " |")
  print(f"| first {few} labels | " + " | ".join(f"{b:.3f}" for _, b in probes) + " |")
  print(f"\nTest accuracy after training on {args.split} of the labels:\n")
  print("| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
  print("|---|" + "---|" * (len(seeds) + 1))
  for name, accs in results.items():
    print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.mean(accs):.3f} |")


if __name__ == "__main__":
  main()
