"""Train and evaluate a model from a config file.

    python main.py                                   # the demo: a small ViT on the bundled digits
    python main.py --config configs/vit.py:variant=Ti/16,dataset=cifar10 --workdir workdirs/ti16
    python main.py --config configs/vit.py --config.optim.lr=1e-3 --config.total_steps=2000 --workdir DIR

Rerunning the same command resumes from the newest checkpoint in --workdir.
SIGTERM (a preemption notice) saves at the next step boundary and exits with status 143.

On several hosts run the same command on every host: with --distributed the job is
detected (Cloud TPU, SLURM, Open MPI, Kubernetes); elsewhere give
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).  On one machine,
`python -m vit_jax.launch --processes 2 --devices 2 -- main.py ...` simulates that.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))


def _one_line(e: Exception) -> str:
  """An error from flag or config parsing as one line (the innermost message, no traceback)."""
  text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
  if "Traceback" in text:
    text = text.rsplit("Error: ", 1)[-1]
  if len(text) > 1 and text[0] == text[-1] == "'":  # a KeyError's repr quotes the whole message
    text = text[1:-1]
  return text


try:  # config_flags already parses --config.* overrides here, at definition time
  _CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "vit.py"),
                                            "Config file, optionally with arguments: configs/vit.py:variant=B/16",
                                            lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
  sys.exit(f"error: bad command-line flag: {_one_line(e)}")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(ROOT, "workdirs", "demo"),
                               "Checkpoints, metrics.jsonl, TensorBoard events and the resolved config go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                  "Join a multi-host job detected from the environment (Cloud TPU, SLURM, Open MPI, "
                                  "Kubernetes): jax.distributed.initialize() with no arguments.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0's coordination service (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1 (default: $JAX_PROCESS_ID).")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: saved and stopped; rerun to resume


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sys.path.insert(0, ROOT)
  if not flags.FLAGS["verbosity"].present:  # library INFO chatter off; the progress line is printed
    logging.set_verbosity(logging.WARNING)
  from vit_jax import cli, runtime
  runtime.tune_xla_cpu()
  from vit_jax.train import multihost, trainer

  try:
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value)
    # Before anything compiles: a second start of the run loads its programs from this cache.
    runtime.compilation_cache(_CONFIG.value.get("compilation_cache", "user"), _WORKDIR.value)
  except ValueError as e:
    sys.exit(cli.fail(e))
  try:
    final = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted:
    sys.exit(PREEMPTED_EXIT_CODE)  # the trainer printed what it saved
  except (*cli.INPUT_ERRORS, trainer.NonFiniteLossError) as e:
    sys.exit(cli.fail(e))
  if final:  # the last line: what a script or a reader looks for
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()) + f" (workdir {_WORKDIR.value})")


def parse_flags(argv):
  """absl's parser, with a bad --config override reported on one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # any failure here is a problem with the command line
    sys.exit(f"error: bad command-line flag: {_one_line(e)}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
