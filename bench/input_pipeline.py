"""Input pipeline throughput next to what the train step consumes, on this machine, in one run.

    .venv/bin/python bench/input_pipeline.py            # digits demo + 224 px JPEG folder with Ti/16

For each case it prints the images/s the grain pipeline delivers as the trainer
uses it (small datasets held in memory, batched preprocessing, uint8 images; in
two threads, or in worker processes) and, for reference, the same pipeline
example by example (each example read as stored, grain's per-example
`random_map`, float32 images: as the trainer fed itself before),
next to the images/s the jitted train step of the matching model consumes; a
ratio above 1 means the input keeps up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import runtime  # noqa: E402

runtime.tune_xla_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.vit import get_config  # noqa: E402
import grain.python as grain  # noqa: E402

from vit_jax.data import input_pipeline, preprocess  # noqa: E402
from vit_jax.train import optim, tasks  # noqa: E402


class PerExample(grain.RandomMapTransform):
  def __init__(self, spec):
    self.ops = preprocess.parse(spec)

  def random_map(self, example, rng):
    out = preprocess.apply(self.ops, dict(example), rng)
    return {"image": np.asarray(out["image"], np.float32), "label": np.int32(out["label"])}


def per_example(source, pp, batch):
  """The pipeline example by example, as the trainer fed itself before: each example read from the
  stored dataset, grain's random_map, float32 images, then batching (two threads)."""
  data = source.data
  if isinstance(data, input_pipeline.Columns):  # the digits: read them as stored, not from memory
    from vit_jax.data import digits
    data = digits.prepare().as_data_source(split="train")
  ds = grain.MapDataset.source(data).shuffle(seed=0).repeat(None).random_map(PerExample(pp), seed=1)
  return ds.batch(batch).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def pipeline_rate(make, batch, batches):
  it = iter(make())
  for _ in range(3):
    next(it)  # threads or workers started, buffers filled once
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - t)


def step_rate(config, num_classes, batch, image_shape, steps):
  task = tasks.Classification(config, num_classes)
  images = jnp.zeros((batch, *image_shape), jnp.float32)
  variables = task.init(jax.random.key(0), images)
  params = variables.pop("params")
  tx, _ = optim.build(config.optim, params, total_steps=1000, steps_per_epoch=100, batch_size=batch)
  opt = tx.init(params)

  @jax.jit
  def step(params, extra, opt, batch, rng):
    (loss, (_, extra)), g = jax.value_and_grad(task.loss, has_aux=True)(params, extra, batch, rng)
    u, opt = tx.update(g, opt, params)
    return jax.tree_util.tree_map(jnp.add, params, u), extra, opt, loss

  data = {"image": images, "label": jnp.zeros((batch,), jnp.int32)}
  params, variables, opt, loss = step(params, variables, opt, data, jax.random.key(0))
  loss.block_until_ready()
  t = time.perf_counter()
  for i in range(steps):
    params, variables, opt, loss = step(params, variables, opt, data, jax.random.key(i))
  loss.block_until_ready()
  return batch * steps / (time.perf_counter() - t)


def jpeg_folder(root, n=64, size=256):
  from PIL import Image
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(os.path.join(root, "train", c), exist_ok=True)
    for i in range(n // 2):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
          os.path.join(root, "train", c, f"{i}.jpg"), quality=90)
  return root


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--workers", default="0,1,2", help="worker processes to try (0: two threads)")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  rows = []

  def case(name, src, pp, batch, batches, train):
    rows.append((name, pp, batch, "per example (reference)", pipeline_rate(lambda: per_example(src, pp, batch),
                                                                            batch, batches), train))
    for w in workers:
      make = lambda: input_pipeline.train_dataset(src, pp, batch, seed=0, workers=w, on_device=True)
      how = f"{w} worker process{'es' if w > 1 else ''}" if w else "2 threads"
      rows.append((name, pp, batch, how, pipeline_rate(make, batch, batches),
                   train))

  demo = get_config()
  src = input_pipeline.get_source("digits", "train")
  case("digits 8x8, demo ViT", src, demo.data.pp_train, demo.batch_size, args.batches * 10,
       step_rate(demo, 10, demo.batch_size, (8, 8, 1), args.steps * 20))

  ti = get_config("variant=Ti/16,dataset=folder")
  with tempfile.TemporaryDirectory() as tmp:
    src = input_pipeline.get_source(f"folder:{jpeg_folder(tmp)}", "train")
    case("JPEG 256px -> 224, ViT-Ti/16", src, ti.data.pp_train, 32, args.batches, step_rate(ti, 2, 32, (224, 224, 3),
                                                                                          args.steps))

  print(f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cores; "
        "train step: float32 AdamW")
  print("| case | preprocessing | batch | pipeline | pipeline img/s | train step img/s | pipeline / step |")
  print("|---|---|---|---|---|---|---|")
  for name, pp, batch, how, pipe, train in rows:
    pp = pp.replace("|", "\\|")  # a literal bar inside a Markdown table cell
    print(f"| {name} | `{pp}` | {batch} | {how} | {pipe:,.0f} | {train:,.1f} | {pipe / train:.1f}x |")


if __name__ == "__main__":
  main()
