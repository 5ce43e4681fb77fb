"""Decoding throughput: jit'd greedy and beam search (one lax.while_loop) against a Python loop over steps.

    python bench/decode.py                                  # random-weight models, fixed 80 steps
    python bench/decode.py --workdir workdirs/s2s_luong     # a trained checkpoint on its held-out sources

Every method decodes the same batches; a random-weight model rarely emits the end token, so all of them
run the full `--max_len` steps (the Python loop stops early exactly when the jit'd loop does).  The
Python loop calls one jit'd decoder step per token and reads the argmax back to the host, as a
straightforward port of the Keras inference loop would.  Printed: sentences per second (median of
`--repeats`), the first call's time (compilation included) and the speed relative to the Python loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax import decode, runtime  # noqa: E402
from vit_jax.models.seq2seq import Seq2Seq  # noqa: E402

MODELS = {
    "lstm-none": dict(attention="none", hidden=256),
    "lstm-luong": dict(attention="luong", hidden=256),
    "bilstm-bahdanau": dict(attention="bahdanau", hidden=128, bidirectional=True),
    "transformer": dict(kind="transformer", hidden=256, num_layers=3, num_heads=4, mlp_dim=1024),
}


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return first, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", help="a trained seq2seq run (default: random-weight models)")
  parser.add_argument("--models", default=",".join(MODELS), help=f"random-weight models from {list(MODELS)}")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--source_len", type=int, default=48)
  parser.add_argument("--max_len", type=int, default=80)
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  runtime.tune_xla_cpu()

  cases = []
  if args.workdir:
    from vit_jax.translate import Translator
    from vit_jax.data import text
    import json
    tr = Translator(args.workdir)
    with open(os.path.join(args.workdir, "config.json")) as f:
      data_config = json.load(f)["data"]
    data = text.load_text_data(data_config["name"], **data_config.get("text", {}))
    source = tr.encode([p.source for p in data.test[:args.batch]])
    cases.append((os.path.basename(os.path.normpath(args.workdir)), tr.model, tr.variables, source, tr.target_len))
  else:
    rng = np.random.default_rng(0)
    source = rng.integers(4, 70, (args.batch, args.source_len)).astype(np.int32)
    for name in args.models.split(","):
      model = Seq2Seq(70, 90, **MODELS[name])
      variables = model.init(jax.random.key(0), jnp.asarray(source[:1]), jnp.ones((1, 4), jnp.int32))
      cases.append((name, model, variables, source, args.max_len))

  print(f"{jax.devices()[0].platform}, batch {args.batch}, beam {args.beam}, median of {args.repeats}")
  print(f"| model | method | sentences/s | first call s | vs Python loop |")
  print(f"|---|---|---|---|---|")
  for name, model, variables, source, max_len in cases:
    source = jnp.asarray(source)
    step_fn = jax.jit(functools.partial(decode._step, model))
    greedy = jax.jit(functools.partial(decode.greedy, model, max_len=max_len))
    beam = jax.jit(functools.partial(decode.beam_search, model, max_len=max_len, beam_size=args.beam))
    methods = [
        ("python loop, greedy", lambda: decode.greedy_python(model, variables, source, max_len=max_len,
                                                              step_fn=step_fn)),
        ("jit greedy", lambda: greedy(variables, source)),
        (f"jit beam {args.beam}", lambda: beam(variables, source)),
    ]
    base = None
    for method, fn in methods:
      first, times = timed(fn, args.repeats)
      rate = source.shape[0] / statistics.median(times)
      base = base or rate
      print(f"| {name} | {method} | {rate:.1f} | {first:.1f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
