"""The seq2seq training step per model: pairs per second on the generated English-French corpus.

    .venv/bin/python bench/seq2seq_step.py

Each model is the trainer's own update step (`trainer.build_program`: loss, gradients, clipping, Adam or
AdamW, one device) of configs/seq2seq.py, timed on real training batches of the corpus at the two most
common lengths of the length buckets (64 pairs, source and target cut to 32 or 48 tokens): the median
of `--steps` steps after one compiling call.  "epoch" weights the per-length rates by how often each
length occurs in an epoch (the lengths the training loop sees), which is what the trainer's progress line
reports.  The Transformer rows separate the cost of dropout: its masks drawn with threefry (one
`jax.random.bits` per element, as `flax.linen.Dropout` does) or hashed (`vit_jax.models.dropout`); dropout
also after the MLP's activation (on `mlp_dim` = 4 x width features, as the reference ViT block), only
on the embeddings and each branch's output (the original Transformer's placement, the config's
default), or none.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import seq2seq  # noqa: E402
from vit_jax.data import input_pipeline, text  # noqa: E402
from vit_jax.models import dropout as dropout_masks  # noqa: E402
from vit_jax.train import sharding, trainer  # noqa: E402

MODELS = {  # key: (description, config argument, model overrides, dropout masks)
    "luong": ("Luong general, bi-LSTM", "model=luong", {}, "hash"),
    "bahdanau": ("Bahdanau, bi-LSTM", "model=bahdanau", {}, "hash"),
    "tf2-threefry-hidden": ("Transformer 2+2, threefry masks, dropout also after the MLP activation",
                            "model=transformer,layers=2", {"hidden_dropout_rate": 0.1}, "threefry"),
    "tf2-threefry": ("Transformer 2+2, threefry masks, dropout on branch outputs", "model=transformer,layers=2",
                     {}, "threefry"),
    "tf2-hidden": ("Transformer 2+2, dropout also after the MLP activation", "model=transformer,layers=2",
                   {"hidden_dropout_rate": 0.1}, "hash"),
    "tf2": ("Transformer 2+2, dropout on branch outputs (config)", "model=transformer,layers=2", {}, "hash"),
    "tf2-nodrop": ("Transformer 2+2, no dropout", "model=transformer,layers=2", {"dropout_rate": 0.0}, "hash"),
    "tf3": ("Transformer 3+3, dropout on branch outputs (config)", "model=transformer,layers=3", {}, "hash"),
}


def batches_by_length(config, lengths):
  """One real training batch per cut length, and how often each length occurs in an epoch."""
  data = text.load_text_data(config.data.name, **config.data.text.to_dict())
  stream = input_pipeline.LengthBucketedBatches(text.EncodedPairs(data.train, data), config.batch_size,
                                                config.seed)
  found, counts = {}, {}
  for i in range(stream.per_epoch):
    batch = stream[i]
    n = batch["source"].shape[1]
    counts[n] = counts.get(n, 0) + 1
    found.setdefault(n, batch)
  missing = [n for n in lengths if n not in found]
  if missing:
    raise SystemExit(f"error: no batch of length {missing}; lengths in an epoch: {sorted(counts)}")
  return data, {n: found[n] for n in lengths}, counts


def _threefry_bits(rng, shape):
  return jax.random.bits(rng, tuple(shape), jnp.uint32)  # one threefry draw per element


def time_model(arg, overrides, masks, data, batches, steps, runlocal=False):
  """{length: (pairs per second, compile seconds)} of one model's update step."""
  hashed = dropout_masks.random_bits
  dropout_masks.random_bits = _threefry_bits if masks == "threefry" else hashed
  try:
    return _time_model(arg, overrides, data, batches, steps, runlocal)
  finally:
    dropout_masks.random_bits = hashed


def _time_model(arg, overrides, data, batches, steps, runlocal):
  config = seq2seq.get_config(arg + (",runlocal" if runlocal else ""))
  config.model.update(overrides)
  mesh = sharding.make_mesh((("data", -1),), devices=jax.devices()[:1])
  info = {"text": data}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
    program = trainer.build_program(config, mesh, len(data.target_vocab), info, total_steps=4000,
                                    steps_per_epoch=168.0)
    state = jax.jit(program.init_state, out_shardings=program.state_sharding)(jax.random.key(0))
    rep = lambda a: jax.device_put(a, program.replicated)
    guard = {"step": rep(np.int32(0)), "loss": rep(np.float32(0))}
    constants = jax.tree_util.tree_map(rep, program.task.constants)
    rates = {}
    for n, batch in batches.items():
      batch = jax.device_put(dict(batch), program.batch_sharding)
      t0 = time.perf_counter()
      state, guard, metrics = program.step_fn(state, guard, constants, batch)
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        state, guard, metrics = program.step_fn(state, guard, constants, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
      rates[n] = (len(batch["source"]) / statistics.median(times), compile_s)
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
  parser.add_argument("--lengths", default="32,48")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--runlocal", action="store_true", help="the config's small corpus (a smoke test)")
  args = parser.parse_args()
  names = [m for m in args.models.split(",") if m]
  unknown = [m for m in names if m not in MODELS]
  if unknown:
    raise SystemExit(f"error: unknown models {unknown}: choose from {list(MODELS)}")
  lengths = [int(n) for n in args.lengths.split(",")]
  data, batches, counts = batches_by_length(seq2seq.get_config("runlocal" if args.runlocal else ""), lengths)
  weights = {n: counts[n] for n in lengths}
  rows = []
  for name in names:
    name, arg, overrides, masks = MODELS[name]
    rates = time_model(arg, overrides, masks, data, batches, args.steps, args.runlocal)
    # Pairs per second over the measured lengths, each weighted by its share of an epoch's batches.
    epoch = sum(weights.values()) / sum(w / rates[n][0] for n, w in weights.items())
    rows.append((name, rates, epoch))
    print(f"  {name}: " + ", ".join(f"{n} tokens {r:.0f} pairs/s (compile {c:.1f} s)" for n, (r, c) in rates.items()),
          flush=True)
  base = rows[0][2]
  print(f"\n# jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; batch 64; "
        f"lengths {lengths} weighted by their share of an epoch ({', '.join(f'{n}: {weights[n]}' for n in lengths)}"
        " batches)")
  print("| model | " + " | ".join(f"{n} tokens" for n in lengths) + f" | epoch | vs {rows[0][0]} |")
  print("|---|" + "---|" * (len(lengths) + 2))
  for name, rates, epoch in rows:
    cells = " | ".join(f"{rates[n][0]:.0f}" for n in lengths)
    print(f"| {name} | {cells} | {epoch:.0f} | {epoch / base:.2f}x |")


if __name__ == "__main__":
  main()
