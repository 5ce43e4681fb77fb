"""ViT-B/16 on one GPU: vit_jax's train step and inference against timm on PyTorch, same GPU, same run.

Setup on a CUDA 12 machine with Python 3.11 (from the repository root):

    python -m venv .venv-gpu
    .venv-gpu/bin/pip install -c constraints.txt -e . "jax[cuda12]==$(grep '^jax==' constraints.txt | cut -d= -f3)"
    .venv-gpu/bin/pip install torch timm          # the CUDA build PyTorch's index gives for this machine
    .venv-gpu/bin/python bench/gpu_vit.py         # ViT-B/16, 224 px, bfloat16, batch 256

Both sides train the same model (timm's `vit_base_patch16_224`: class token, exact GELU, LayerNorm
eps 1e-6, 1000 classes) with AdamW (float32 parameters and states), softmax cross-entropy, synthetic
data already on the GPU, in bfloat16 compute (`config.dtype=bfloat16`; PyTorch: autocast).  vit_jax's
step is the trainer's own (`trainer.lower_train_step`), images sent as uint8 and scaled on the
device.  timm runs eagerly and under `torch.compile`.  MFU: XLA's FLOP count of our compiled step
(and of the forward pass for inference) over the step time, against the GPU's dense bfloat16 peak
(`--peak-tflops`, else the table below by device name); the same FLOP count serves PyTorch's rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.vit import get_config  # noqa: E402
from vit_jax.train import sharding, tasks, trainer  # noqa: E402

PEAK_BF16_TFLOPS = {  # dense bfloat16 tensor-core peaks, by a word of jax's device_kind
    "H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0,
    "V100": 125.0}


def peak_tflops(kind: str, given: float | None) -> float | None:
  if given:
    return given
  for name, value in PEAK_BF16_TFLOPS.items():
    if name in kind:
      return value
  return None


def config(args):
  c = get_config(f"variant={args.variant}")
  c.dtype = args.dtype
  c.batch_size = args.batch
  c.model.update(dict(num_classes=1000, pool_type="token", activation="gelu", head_zeroinit=False))
  if args.depth:
    c.model.depth = args.depth
  c.data.pp_train = "value_range(-1, 1)"
  c.data.image_size = args.resolution
  return c


def timed(fn, steps: int, rounds: int) -> float:
  """Median seconds per call over `rounds` of `steps` calls (after one warm-up round)."""
  fn(steps)
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    fn(steps)
    times.append((time.perf_counter() - t) / steps)
  return statistics.median(times)


def jax_rates(args):
  c = config(args)
  mesh = sharding.make_mesh((("data", -1),), devices=jax.devices()[:1])
  r = args.resolution
  host = {"image": np.random.default_rng(0).integers(0, 256, (args.batch, r, r, 3), np.uint8),
          "label": np.random.default_rng(1).integers(0, 1000, (args.batch,), np.int32)}
  lowered = trainer.lower_train_step(c, mesh, 1000, host)
  compiled = lowered.compile()
  train_flops = compiled.cost_analysis()["flops"] if isinstance(compiled.cost_analysis(), dict) \
      else compiled.cost_analysis()[0]["flops"]
  with jax.set_mesh(mesh):
    program = trainer.build_program(c, mesh, 1000, total_steps=100, steps_per_epoch=10.0)
    state = jax.jit(program.init_state, out_shardings=program.state_sharding)(jax.random.key(0))
  guard = {"step": jnp.int32(0), "loss": jnp.float32(0)}
  batch = jax.device_put(host)

  def train(steps):
    nonlocal state, guard
    for _ in range(steps):
      state, guard, m = compiled(state, guard, {}, batch)
    jax.block_until_ready(m["train/loss"])

  task = tasks.get_task(c, 1000)
  images = jax.device_put(jnp.asarray(host["image"], jnp.float32) / 127.5 - 1)
  forward = jax.jit(lambda p, x: task.model.apply({"params": p}, x)[0])
  infer_flops = forward.lower(state["params"], images).compile().cost_analysis()
  infer_flops = (infer_flops if isinstance(infer_flops, dict) else infer_flops[0])["flops"]

  def infer(steps):
    for _ in range(steps):
      out = forward(state["params"], images)
    out.block_until_ready()

  return (timed(train, args.steps, args.rounds), train_flops, timed(infer, args.steps, args.rounds), infer_flops)


def torch_rates(args, compile_model: bool):
  import timm
  import torch

  torch.backends.cuda.matmul.allow_tf32 = True
  device = "cuda"
  model = timm.create_model("vit_base_patch16_224", num_classes=1000, img_size=args.resolution).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
  images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
  labels = torch.randint(0, 1000, (args.batch,), device=device)
  run = torch.compile(model) if compile_model else model
  loss_fn = torch.nn.CrossEntropyLoss()

  def train(steps):
    for _ in range(steps):
      with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(run(images), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    torch.cuda.synchronize()

  def infer(steps):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
      for _ in range(steps):
        run(images)
    torch.cuda.synchronize()

  return timed(train, args.steps, args.rounds), timed(infer, args.steps, args.rounds)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--depth", type=int, default=None, help="override the variant's depth (a quick check)")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()
  device = jax.devices()[0]
  peak = peak_tflops(device.device_kind, args.peak_tflops)
  train_s, train_flops, infer_s, infer_flops = jax_rates(args)
  rows = [("vit_jax (XLA)", train_s, infer_s)]
  if not args.skip_torch:
    rows.append(("timm, PyTorch eager", *torch_rates(args, False)))
    rows.append(("timm, torch.compile", *torch_rates(args, True)))
  print(f"# {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.variant} at {args.resolution} px, "
        f"batch {args.batch}, {args.dtype}; XLA FLOPs per image: train {train_flops / args.batch / 1e9:.1f} G, "
        f"inference {infer_flops / args.batch / 1e9:.1f} G; peak {peak or '?'} TFLOP/s")
  print("| run | train img/s | train MFU | inference img/s | inference MFU | train / timm eager |")
  print("|---|---|---|---|---|---|")
  base = rows[1][1] if len(rows) > 1 else None
  mfu = lambda flops, s: f"{100 * flops / s / (peak * 1e12):.1f}%" if peak else "?"
  for name, ts, fs in rows:
    print(f"| {name} | {args.batch / ts:,.0f} | {mfu(train_flops, ts)} | {args.batch / fs:,.0f} | "
          f"{mfu(infer_flops, fs)} | {base / ts if base else float('nan'):.2f}x |")


if __name__ == "__main__":
  main()
