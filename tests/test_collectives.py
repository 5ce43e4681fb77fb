"""The train step's communication on 8 simulated devices, read from the HLO XLA compiles.

A plain ViT (patch stem, depth 2, width 64, 4 heads, MLP 128; a global batch of 16 8x8 images) with
mixup and CutMix on: under `data` only the gradients are reduced; under `fsdp` parameters are gathered
and gradients reduced, never activations moved; under `data x tensor` each block does Megatron's four
activation all-reduces (two forward, two backward) and nothing reshuffles q / k / v.
"""

import math
import re

import numpy as np
import pytest

from configs.vit import get_config
from vit_jax.train import sharding, trainer

DEPTH, WIDTH, TOKENS, BATCH = 2, 64, 16, 16
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def config(mesh, **overrides):
  c = get_config()
  c.model = dict(width=WIDTH, depth=DEPTH, mlp_dim=128, num_heads=4, patch_size=2, stem="patch", channels=1,
                 pool_type="gap", head_zeroinit=False)
  c.mesh, c.batch_size = mesh, BATCH
  c.mixup = dict(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5)
  for k, v in overrides.items():
    c[k] = v
  return c


def collectives(c):
  """[(kind, [shape, ...])] of every collective in the compiled step, and the parameter shapes."""
  mesh = sharding.make_mesh(c.mesh)
  batch = {"image": np.zeros((BATCH, 8, 8, 1), np.uint8), "label": np.zeros((BATCH,), np.int32)}  # as sent
  text = trainer.lower_train_step(c, mesh, 10, batch).compile().as_text()
  found = []
  for line in text.splitlines():
    m = re.search(r"= (.*?) (" + "|".join(KINDS) + r")(?:-start)?\(", line)
    if m:
      shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([0-9,]*)\]", m.group(1))]
      found.append((m.group(2), shapes))
  assert found, "no collectives at all: the step did not compile for 8 devices"
  return found


def count(found, kind):
  return sum(1 for k, _ in found if k == kind)


PARAMS = {  # elements of every parameter of the model above
    "embedding": 2 * 2 * 1 * WIDTH + WIDTH, "posemb": TOKENS * WIDTH, "head": WIDTH * 10 + 10,
    "norms": (2 * DEPTH + 1) * 2 * WIDTH,
    "blocks": DEPTH * (4 * (WIDTH * WIDTH + WIDTH) + 2 * WIDTH * 128 + 128 + WIDTH)}
NUM_PARAMS = sum(PARAMS.values())


def test_data_parallel_reduces_only_the_gradients():
  found = collectives(config([("data", -1)]))
  assert {k for k, _ in found} == {"all-reduce"}, found  # no permute (mixing pairs within a shard), no gather
  reduced = sum(math.prod(s) for _, shapes in found for s in shapes)
  assert NUM_PARAMS <= reduced <= NUM_PARAMS + 32, (reduced, NUM_PARAMS)  # the gradients and a few scalars


def test_fsdp_gathers_parameters_and_moves_no_activations():
  found = collectives(config([("fsdp", -1)], fsdp_min_size=1))  # every parameter sharded
  assert count(found, "collective-permute") == 0
  assert count(found, "all-gather") >= 4 * DEPTH  # the blocks' kernels, gathered where they are used
  gathered = sum(math.prod(s) for k, shapes in found if k == "all-gather" for s in shapes)
  # Parameters gathered for the forward pass (once or, rematerialised, twice) and the head's
  # [batch, classes] logit gradient, which XLA gathers instead of the [width, classes] kernel.
  assert NUM_PARAMS <= gathered <= 2 * NUM_PARAMS, (gathered, NUM_PARAMS)
  # Nothing token-sized is gathered: the largest gathered array (the stacked q / k / v kernel) is smaller.
  assert max(math.prod(s) for k, shapes in found if k == "all-gather" for s in shapes) < BATCH * TOKENS * WIDTH
  # Gradients: reduce-scatters on GPU / TPU; XLA's CPU backend reduces, then each device keeps its slice.
  reduced = sum(math.prod(s) for k, shapes in found if k in ("all-reduce", "reduce-scatter", "all-to-all")
                for s in shapes)
  assert reduced >= NUM_PARAMS // 8


@pytest.mark.parametrize("depth", [1, DEPTH])
def test_tensor_parallel_is_the_megatron_pattern(depth):
  found = collectives(config([("data", 4), ("tensor", 2)], model=dict(config([]).model, depth=depth)))
  assert {k for k, _ in found} == {"all-reduce"}, found  # no q / k / v reshuffle, no gathers
  activations = [s for _, shapes in found for s in shapes if s == (BATCH // 4, TOKENS, WIDTH)]
  assert len(activations) == 4 * depth  # attention out + MLP out forward, their inputs' gradients backward
