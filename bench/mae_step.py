"""Cost of an MAE pre-training step next to a supervised ViT step of the same encoder, same run.

    .venv/bin/python bench/mae_step.py --variant B/16 --batch 8
    .venv/bin/python bench/mae_step.py --variant S/16 --batch 8 --decoders 256x1,128x1

At mask ratio 0.75 the encoder sees a quarter of the patches, so the encoder
costs about a quarter of the ViT step; the decoder (WIDTHxDEPTH, one row per
entry of --decoders) runs on every patch and adds its own share.  The paper's
8-block, 512-wide decoder alone costs about 0.3 of a ViT-B/16 step in FLOPs; its
ablation's 1-block decoder (fine-tuning accuracy 84.8 vs 84.9) keeps the whole
step under a third.  Rounds alternate between the models so that machine-load
drift hits all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import runtime  # noqa: E402

runtime.tune_xla_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from configs.mae import decoder_size  # noqa: E402
from configs.models import decode_variant  # noqa: E402
from vit_jax.models.mae import MaskedAutoencoder  # noqa: E402
from vit_jax.models.vit import VisionTransformer  # noqa: E402


def make_step(loss_fn, params):
  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, images, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, rng)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss
  return step, opt


def timed(step, params, opt, images, steps):
  t0 = time.perf_counter()
  params, opt, loss = step(params, opt, images, jax.random.key(0))
  loss.block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t = time.perf_counter()
    params, opt, loss = step(params, opt, images, jax.random.key(i + 1))
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  return params, opt, first, times


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--decoders", default="512x8,512x1",
                      help="comma-separated decoder WIDTHxDEPTH (heads = width / 32, as in 512 / 16)")
  args = parser.parse_args()
  size = decode_variant(args.variant)
  patch = size["patch_size"][0]
  images = jax.random.normal(jax.random.key(0), (args.batch, args.resolution, args.resolution, 3))
  labels = jnp.arange(args.batch) % 1000

  vit = VisionTransformer(num_classes=1000, patch_size=patch, width=size["width"], depth=size["depth"],
                          mlp_dim=size["mlp_dim"], num_heads=size["num_heads"], activation="gelu")
  vit_params = jax.jit(vit.init)(jax.random.key(0), images[:1])["params"]

  def vit_loss(p, x, rng):
    logits, _ = vit.apply({"params": p}, x, train=True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  runs = {"ViT (supervised)": [vit_params, *make_step(vit_loss, vit_params)[::-1]]}
  for spec in args.decoders.split(","):
    width, depth = decoder_size(spec)
    mae = MaskedAutoencoder(patch_size=patch, width=size["width"], depth=size["depth"], mlp_dim=size["mlp_dim"],
                            num_heads=size["num_heads"], decoder_width=width, decoder_depth=depth,
                            decoder_heads=max(1, width // 32), norm_pix_loss=True)
    mae_params = jax.jit(lambda r, m=mae: m.init({"params": r, "masking": r}, images[:1]))(jax.random.key(0))
    mae_params = mae_params["params"]

    def mae_loss(p, x, rng, m=mae):
      return m.apply({"params": p}, x, train=True, rngs={"masking": rng, "dropout": rng})[0]
    runs[f"MAE, decoder {width}x{depth}"] = [mae_params, *make_step(mae_loss, mae_params)[::-1]]
  # runs[name] = [params, opt, step]
  stats = {name: {"first": None, "times": []} for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      params, opt, step = run
      params, opt, first, times = timed(step, params, opt, images, args.steps)
      run[0], run[1] = params, opt
      stats[name]["first"] = stats[name]["first"] or first
      stats[name]["times"] += times

  print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; {args.variant} encoder "
        f"@ {args.resolution}px, batch {args.batch}, float32, AdamW; MAE at mask 0.75 with norm-pix")
  print("| train step | ms/step (median) | img/s | first call s | / ViT step |")
  print("|---|---|---|---|---|")
  reference = statistics.median(stats["ViT (supervised)"]["times"])
  for name, s in stats.items():
    median = statistics.median(s["times"])
    print(f"| {name} | {1000 * median:.0f} | {args.batch / median:.1f} | {s['first']:.1f} | {median / reference:.2f} |")


if __name__ == "__main__":
  main()
