"""One process of a multi-process test job (run by `vit_jax.launch.Job`): trains each spec in turn.

    python tests/multihost_worker.py SPECS.json

SPECS.json: [{"config": "configs.vit", "arg": "...", "overrides": {"model.width": 16, ...},
"workdir": DIR}, ...].  The job is joined from the launcher's environment, once for all specs, so a
test pays for the processes' start and `jax.distributed.initialize` only once.
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import runtime  # noqa: E402

runtime.tune_xla_cpu()

from vit_jax.train import multihost, sharding, trainer  # noqa: E402


def set_all(config, overrides):
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[leaf] = tuple(tuple(v) for v in value) if key in ("mesh", "mesh_dcn") and value else value
  return config


def main(path):
  multihost.initialize()
  with open(path) as f:
    specs = json.load(f)
  for spec in specs:
    config = set_all(importlib.import_module(spec["config"]).get_config(spec.get("arg")), spec.get("overrides", {}))
    mesh = sharding.make_mesh(config.mesh, dcn=config.get("mesh_dcn"))
    layout = {"axes": list(mesh.axis_names), "processes": [[[d.process_index for d in row] for row in plane]
                                                          for plane in mesh.devices.tolist()]}
    print(f"mesh: {json.dumps(layout)}", flush=True)  # which process holds each mesh position
    trainer.train_and_evaluate(config, spec["workdir"])
    print(f"done: {spec['workdir']}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
