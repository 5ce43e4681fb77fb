"""ViT train-step and inference benchmark: vit_jax against Hugging Face ViT (PyTorch) in the same run.

    .venv/bin/python bench/vit_step.py --variant Ti/16 --resolution 224 --batch 32

Both sides run the same architecture (exact GELU, LayerNorm eps 1e-6, qkv bias,
class token, 1000-class head), AdamW with float32 states, softmax cross-entropy,
synthetic data resident in memory.  Rounds alternate jax / torch so that machine
noise hits both; the table reports medians, for the train step and for inference (the
forward pass alone: jitted here, `torch.no_grad()` in eval mode there).  `--gelu tanh` runs both sides
with the tanh approximation (flax's default, HF "gelu_pytorch_tanh") instead.
By default XLA:CPU runs with `vit_jax.runtime.tune_xla_cpu()`;
`--xla-default-flags` shows XLA's defaults.  Also printed: the fraction of the
measured float32 matmul peak our step reaches (model FLOPs = 3 x forward), and
trace+compile time of the step for two depths with and without `nn.scan`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import runtime  # noqa: E402

if "--xla-default-flags" not in sys.argv:
  runtime.tune_xla_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs.models import decode_variant  # noqa: E402
from vit_jax.models.vit import VisionTransformer  # noqa: E402


GELU = {"exact": ("gelu", "gelu"), "tanh": ("gelu_tanh", "gelu_pytorch_tanh")}  # ours, Hugging Face


def vit_forward_flops(width, depth, mlp_dim, patch, resolution, num_classes, channels=3):
  """Matmul FLOPs of one forward pass (1 MAC = 2 FLOPs)."""
  n = (resolution // patch[0]) * (resolution // patch[1]) + 1
  per_layer = 2 * n * (4 * width * width + 2 * width * mlp_dim) + 4 * n * n * width
  embed = 2 * (n - 1) * channels * patch[0] * patch[1] * width
  return depth * per_layer + embed + 2 * width * num_classes


def matmul_peak(n=2048, repeats=5):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timeit(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def _timeit(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def make_jax_step(model, tx):
  def loss_fn(params, images, labels):
    logits, _ = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def jax_setup(args, cfg, depth=None, scan=False, model_out=None):
  model = VisionTransformer(num_classes=1000, activation=GELU[args.gelu][0], scan=scan,
                            **dict(cfg, depth=depth or cfg["depth"]))
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (args.batch, args.resolution, args.resolution, 3), np.float32))
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 1000, args.batch))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.05)
  step = jax.jit(make_jax_step(model, tx), donate_argnums=(0, 1))
  if model_out is not None:
    model_out.append(model)
  return step, params, tx.init(params), images, labels


def compile_seconds(args, cfg, depth, scan):
  step, params, opt_state, images, labels = jax_setup(args, cfg, depth, scan)
  t = time.perf_counter()
  step.lower(params, opt_state, images, labels).compile()
  return time.perf_counter() - t


class JaxRunner:
  def __init__(self, args, cfg):
    model = []
    self.step, self.params, self.opt_state, self.images, self.labels = jax_setup(args, cfg, model_out=model)
    self.forward = jax.jit(lambda p, x: model[0].apply({"params": p}, x)[0])

  def run(self, steps):
    for _ in range(steps):
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.images, self.labels)
    loss.block_until_ready()

  def infer(self, steps):
    for _ in range(steps):
      logits = self.forward(self.params, self.images)
    logits.block_until_ready()


class TorchRunner:
  def __init__(self, args, cfg):
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.ViTConfig(
        hidden_size=cfg["width"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=cfg["mlp_dim"], image_size=args.resolution, patch_size=cfg["patch_size"][0],
        num_labels=1000, layer_norm_eps=1e-6, hidden_act=GELU[args.gelu][1], attn_implementation="sdpa")
    self.torch = torch
    self.model = transformers.ViTForImageClassification(config).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    self.images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g)
    self.labels = torch.randint(0, 1000, (args.batch,), generator=g)

  def run(self, steps):
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      logits = self.model(pixel_values=self.images).logits
      loss = self.torch.nn.functional.cross_entropy(logits, self.labels)
      loss.backward()
      self.opt.step()

  def infer(self, steps):
    self.model.eval()
    with self.torch.no_grad():
      for _ in range(steps):
        self.model(pixel_values=self.images)
    self.model.train()


def _worker(conn, name, args, cfg):
  runner = (JaxRunner if name == "vit_jax" else TorchRunner)(args, cfg)
  conn.send(_timeit(lambda: runner.run(1)))  # the first call (compilation / warm-up)
  runner.infer(1)
  while (request := conn.recv()) is not None:
    what, steps = request
    conn.send(_timeit(lambda: (runner.run if what == "train" else runner.infer)(steps)))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="Ti/16")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=4, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--gelu", choices=sorted(GELU), default="exact", help="GELU form on both sides")
  p.add_argument("--xla-default-flags", action="store_true", help="do not apply vit_jax.runtime.tune_xla_cpu()")
  p.add_argument("--compile-depths", default="12,24", help="depths for the compile-time rows ('' to skip)")
  args = p.parse_args()
  cfg = decode_variant(args.variant)
  if args.resolution % cfg["patch_size"][0] or args.resolution % cfg["patch_size"][1]:
    raise SystemExit(f"--resolution {args.resolution} is not divisible by the patch size {cfg['patch_size']}")

  print(f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{os.cpu_count()} cores; {args.variant} @ {args.resolution}px, batch {args.batch}, float32, AdamW, "
        f"{args.gelu} GELU; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  peak = matmul_peak()
  flops_img = 3 * vit_forward_flops(cfg["width"], cfg["depth"], cfg["mlp_dim"], cfg["patch_size"],
                                    args.resolution, 1000)

  # Each framework runs in its own worker process (spawned, so torch's thread pool never shares a
  # process with XLA's); the parent alternates timed rounds between them.
  ctx = multiprocessing.get_context("spawn")
  names = ["vit_jax"] + ([] if args.no_torch else ["HF ViT (torch)"])
  workers = {}
  for name in names:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, name, args, cfg), daemon=True)
    proc.start()
    workers[name] = (parent, proc)
  first_call = {name: conn.recv() for name, (conn, _) in workers.items()}
  times = {k: [] for k in names}
  infer_times = {k: [] for k in names}
  for _ in range(args.rounds):
    for name, (conn, _) in workers.items():
      conn.send(("train", args.steps))
      times[name].append(conn.recv() / args.steps)
      conn.send(("infer", args.steps))
      infer_times[name].append(conn.recv() / args.steps)
  for conn, proc in workers.values():
    conn.send(None)
    proc.join()

  rows = []
  for name, ts in times.items():
    med = statistics.median(ts)
    ips = args.batch / med
    rows.append((name, f"{ips:.2f}", f"{args.batch / max(ts):.2f}-{args.batch / min(ts):.2f}",
                 f"{1e3 * med:.0f}", f"{flops_img * ips / 1e9 / peak:.0%}", f"{first_call[name]:.1f}"))
  _table(["train step", "img/s (median)", "img/s range", "ms/step", "of matmul peak", "first call s"], rows)
  print()
  rows = []
  for name, ts in infer_times.items():
    med = statistics.median(ts)
    rows.append((name, f"{args.batch / med:.2f}", f"{args.batch / max(ts):.2f}-{args.batch / min(ts):.2f}",
                 f"{1e3 * med:.0f}", f"{flops_img / 3 * args.batch / med / 1e9 / peak:.0%}"))
  _table(["inference", "img/s (median)", "img/s range", "ms/batch", "of matmul peak"], rows)
  if not args.no_torch:
    ratio = statistics.median(times["HF ViT (torch)"]) / statistics.median(times["vit_jax"])
    infer_ratio = statistics.median(infer_times["HF ViT (torch)"]) / statistics.median(infer_times["vit_jax"])
    print(f"\nvit_jax / HF ViT throughput ratio: train {ratio:.2f}x, inference {infer_ratio:.2f}x   "
          f"(matmul peak {peak:.0f} GFLOP/s, {flops_img / 1e9:.2f} GFLOP per training image)")

  depths = [int(d) for d in args.compile_depths.split(",") if d]
  if depths:
    rows = []
    for scan in (False, True):
      secs = [compile_seconds(args, cfg, d, scan) for d in depths]
      rows.append(("scan" if scan else "unrolled", *(f"{s:.1f}" for s in secs),
                   f"{secs[-1] / secs[0]:.2f}x"))
    print()
    _table(["layers", *(f"compile s, depth {d}" for d in depths), f"depth {depths[-1]} / {depths[0]}"], rows)


def _table(header, rows):
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  print(line(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print(line(r))


if __name__ == "__main__":
  main()
