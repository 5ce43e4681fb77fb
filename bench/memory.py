"""Per-device memory of ViT train steps at scale, by compilation alone (nothing is executed).

    .venv/bin/python bench/memory.py                       # B/16 .. G/14, data and fsdp, 8 and 64 devices
    .venv/bin/python bench/memory.py --variants B/16 --devices 8 --meshes fsdp

Each step is the trainer's: AdamW (float32 moments), softmax cross-entropy, the
encoder under `nn.scan` with a remat policy, parameters sharded by the default
rules (`vit_jax.train.sharding`), the batch split over the mesh's batch axes.  It
is lowered on simulated CPU devices and compiled for memory only
(`compiled.memory_analysis()`): per device, the state (parameters + optimizer) and
the peak of the temporaries, at per-device batches 8, 16, 32, ... until the
temporaries grow with the batch (at small batches the optimizer update's peak can
hide the activations).  Activation memory grows linearly with the batch, so the
last two points give the largest per-device batch that fits a device of each size.  XLA:CPU schedules and fuses differently
from the TPU and GPU compilers, so the numbers are estimates of the same program's
needs, not a measurement on those devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set_devices(n: int) -> None:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


GIB = 2 ** 30
DEVICE_GIB = (16, 32, 80, 141)
FIRST_BATCH, LAST_BATCH = 8, 1024  # per device  # TPU v5e / v4 (32) / A100-H100 80 GB / H200


def step_memory(variant: str, mesh_kind: str, devices: int, per_device_batch: int, *, remat: str = "nothing_saveable",
                resolution: int = 224, num_classes: int = 1000) -> dict[str, float]:
  """Compiled per-device bytes of one train step: {"state", "temp", "args", "out", "compile_s"}."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from configs.models import decode_variant
  from vit_jax.models.vit import VisionTransformer
  from vit_jax.train import sharding

  settings = dict(decode_variant(variant), scan=True, remat_policy=remat, num_classes=num_classes,
                  pool_type="token", activation="gelu")
  model = VisionTransformer(**settings)
  mesh = sharding.make_mesh([(mesh_kind, -1)], devices=jax.devices()[:devices])
  batch = per_device_batch * devices
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3))))
  params_shape = params_shape["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.05))
  state_shape = jax.eval_shape(lambda p: {"params": p, "opt": tx.init(p)}, params_shape)
  params_sharding = sharding.param_shardings(params_shape, mesh)
  state_sharding = sharding.tree_shardings(state_shape, params_shape, params_sharding, mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  def train_step(state, images, labels):
    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(0)})
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape,
                                    state_sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
  images = jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=batch_sharding)
  tic = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):  # as the trainer traces
    compiled = jax.jit(train_step, donate_argnums=(0,)).lower(abstract, images, labels).compile()
  compile_s = time.perf_counter() - tic
  mem = compiled.memory_analysis()
  state_bytes = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
                    for s in jax.tree_util.tree_leaves(abstract))
  return {"state": state_bytes, "temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
          "out": mem.output_size_in_bytes, "compile_s": compile_s,
          "total_state": sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(abstract))}


def profile(variant: str, mesh_kind: str, devices: int, remat: str, resolution: int) -> dict[str, float]:
  """State and temporaries at growing per-device batches: 8, 16, 32, ... until the temporaries have
  grown over two doublings in a row (below that, the optimizer update's peak can hide the activations').

  Returns {"state", "temp_first", "temp_last", "batch_last", "per_example", "compile_s", "compiles"}.
  """
  temps, b, compile_s = {}, FIRST_BATCH, 0.0
  while True:
    m = step_memory(variant, mesh_kind, devices, b, remat=remat, resolution=resolution)
    temps[b], compile_s = m["temp"], compile_s + m["compile_s"]
    grown = [x > y * 1.02 for x, y in zip(list(temps.values())[1:], list(temps.values())[:-1])]
    if (len(grown) >= 2 and grown[-1] and grown[-2]) or b >= LAST_BATCH:
      break
    b *= 2
  last, before = b, b // 2
  per_example = (temps[last] - temps[before]) / (last - before)
  return {"state": m["state"], "temp_first": temps[FIRST_BATCH], "temp_last": temps[last], "batch_last": last,
          "per_example": per_example, "compile_s": compile_s, "compiles": len(temps)}


def fits(p: dict[str, float], capacity: float) -> int:
  """Largest per-device batch whose state + temporaries fit `capacity` bytes.

  Temporaries: the larger of the small-batch peak and the activations' line through the last two points.
  """
  if p["per_example"] <= 0:
    return 0
  budget = capacity - p["state"]
  if budget < p["temp_first"]:
    return 0
  return max(int(p["batch_last"] + (budget - p["temp_last"]) // p["per_example"]), 0)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="B/16,L/16,H/14,g/14,G/14")
  parser.add_argument("--meshes", default="data,fsdp")
  parser.add_argument("--devices", default="8,64")
  parser.add_argument("--remat", default="nothing_saveable", help="remat policy of the scanned blocks (see encoder.py)")
  parser.add_argument("--resolution", type=int, default=224)
  args = parser.parse_args(argv)
  device_counts = [int(d) for d in args.devices.split(",")]
  _set_devices(max(device_counts))
  import jax
  jax.config.update("jax_platforms", "cpu")

  print(f"# jax {jax.__version__}, XLA:CPU memory_analysis of the compiled step; AdamW float32, nn.scan, remat "
        f"{args.remat}, {args.resolution} px, 1000 classes")
  print(f"| model | mesh | devices | state GiB/device | temp GiB at {FIRST_BATCH}/device | MiB per image | "
        + " | ".join(f"batch/device on {g} GiB" for g in DEVICE_GIB) + " | compiles, s |")
  print("|---|---|---|---|---|---|" + "---|" * len(DEVICE_GIB) + "---|")
  for variant in args.variants.split(","):
    for mesh_kind in args.meshes.split(","):
      for devices in device_counts:
        p = profile(variant, mesh_kind, devices, args.remat, args.resolution)
        cells = [str(fits(p, g * GIB)) for g in DEVICE_GIB]
        print(f"| {variant} | {mesh_kind} | {devices} | {p['state'] / GIB:.2f} | {p['temp_first'] / GIB:.2f} | "
              f"{p['per_example'] / 2 ** 20:.1f} | " + " | ".join(cells)
              + f" | {p['compiles']}, {p['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
