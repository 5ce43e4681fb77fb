"""The classic bi-directional LSTM classifier on the bundled digits: each 8-pixel image row is a time step.

    python main.py --config configs/birnn.py --workdir workdirs/birnn_digits
    python main.py --config configs/birnn.py:cell=gru,hidden=64 --workdir workdirs/birnn_gru
  Expected: eval/accuracy ~0.98 on the 360 test digits after 800 steps, under a minute on 2 CPU cores.

It trains through the same classification task and trainer as the ViTs (`model.family = "birnn"`).
"""

from __future__ import annotations

import ml_collections

from configs import vit
from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, cell="lstm", hidden=128, layers=1, runlocal=False)
  c = vit.get_config("variant=digits,runlocal" if arg.runlocal else "variant=digits")
  c.model = ml_collections.ConfigDict(dict(family="birnn", cell=arg.cell, hidden=arg.hidden, num_layers=arg.layers,
                                           merge="concat", dropout_rate=0.1, channels=1))
  c.data.pp_train = "value_range(-1, 1)"  # no crop: a shifted row sequence is a different sequence here
  c.label_smoothing = 0.0
  c.optim.name, c.optim.lr, c.optim.weight_decay = "adamw", 3e-3, 1e-4
  if not arg.runlocal:
    c.total_steps, c.eval_steps = 800, 400
  return c
