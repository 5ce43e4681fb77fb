"""Swin train-step benchmark: vit_jax against Hugging Face Swin (PyTorch) in the same run.

    .venv/bin/python bench/swin_step.py --variant Swin-T --resolution 224 --batch 16

Both sides run the same architecture (the variant's sizes, window, exact GELU, LayerNorm eps 1e-5,
drop path off), AdamW with float32 states, softmax cross-entropy on 1000 classes, synthetic data
resident in memory.  Each framework runs in its own spawned worker process; the parent alternates
timed rounds between them and the table reports medians and the throughput ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.vit_step import _table, _timeit, make_jax_step  # noqa: E402  (also tunes XLA:CPU)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vit_jax.models.variants import swin_settings  # noqa: E402


def settings_of(variant: str) -> dict:
  s = swin_settings(variant)
  if s is None:
    raise SystemExit(f"--variant {variant!r} is not a Swin name (Swin-T, SwinV2-T, ...).")
  s.pop("family")
  return dict(s, num_classes=1000, drop_path_rate=0.0)


class JaxRunner:
  def __init__(self, args):
    from vit_jax.models.swin import SwinTransformer
    model = SwinTransformer(**settings_of(args.variant))
    self.images = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, args.resolution, args.resolution, 3), np.float32))
    self.labels = jnp.asarray(np.random.default_rng(1).integers(0, 1000, args.batch))
    self.params = jax.jit(model.init)(jax.random.key(0), self.images[:1])["params"]
    tx = optax.adamw(1e-4, weight_decay=0.05)
    self.opt_state = tx.init(self.params)
    self.step = jax.jit(make_jax_step(model, tx), donate_argnums=(0, 1))

  def run(self, steps):
    for _ in range(steps):
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.images, self.labels)
    loss.block_until_ready()


class TorchRunner:
  def __init__(self, args):
    import torch
    import transformers

    from vit_jax.interop import swin
    torch.set_num_threads(os.cpu_count() or 1)
    s = settings_of(args.variant)
    cfg = swin.hf_config(s, args.resolution)
    v2 = s["version"] == 2
    config = (transformers.Swinv2Config if v2 else transformers.SwinConfig)(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "dtype")})
    self.torch = torch
    cls = transformers.Swinv2ForImageClassification if v2 else transformers.SwinForImageClassification
    self.model = cls(config).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    self.images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    self.labels = torch.randint(0, 1000, (args.batch,), generator=g)

  def run(self, steps):
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      loss = self.torch.nn.functional.cross_entropy(self.model(pixel_values=self.images).logits, self.labels)
      loss.backward()
      self.opt.step()


def _worker(conn, name, args):
  runner = (JaxRunner if name == "vit_jax" else TorchRunner)(args)
  conn.send(_timeit(lambda: runner.run(1)))  # the first call (compilation / warm-up)
  while (steps := conn.recv()) is not None:
    conn.send(_timeit(lambda: runner.run(steps)))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="Swin-T")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds")
  args = p.parse_args()
  settings_of(args.variant)
  print(f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cores; "
        f"{args.variant} @ {args.resolution}px, batch {args.batch}, float32, AdamW, exact GELU")
  ctx = multiprocessing.get_context("spawn")
  names = ["vit_jax", "HF Swin (torch)"]
  workers = {}
  for name in names:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, name, args), daemon=True)
    proc.start()
    workers[name] = (parent, proc)
  first_call = {name: conn.recv() for name, (conn, _) in workers.items()}
  times = {k: [] for k in names}
  for _ in range(args.rounds):
    for name, (conn, _) in workers.items():
      conn.send(args.steps)
      times[name].append(conn.recv() / args.steps)
  for conn, proc in workers.values():
    conn.send(None)
    proc.join()
  rows = [(name, f"{args.batch / statistics.median(ts):.2f}", f"{1e3 * statistics.median(ts):.0f}",
           f"{first_call[name]:.1f}") for name, ts in times.items()]
  _table(["train step", "img/s (median)", "ms/step", "first call s"], rows)
  ratio = statistics.median(times["HF Swin (torch)"]) / statistics.median(times["vit_jax"])
  print(f"\nvit_jax / HF Swin throughput ratio: {ratio:.2f}x")


if __name__ == "__main__":
  main()
