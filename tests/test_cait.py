"""CaiT: parameter counts of the released sizes, logits against a torch reference written from the paper
under the release's names (every parameter perturbed), timm's names both ways, scan, and the trainer."""

import jax
import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import cait as cait_interop
from vit_jax.interop.tree import flatten
from vit_jax.models.cait import CaiT
from vit_jax.models.variants import CAIT, create_model

SMALL = dict(num_classes=5, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=48, layer_scale_init=0.1)
GRID = (3, 2)


def images(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 4 * GRID[0], 4 * GRID[1], 3)).astype(np.float32)


@pytest.mark.parametrize("variant, count", [
    ("XXS-24", 11_956_264), ("XXS-36", 17_299_720), ("XS-24", 26_670_088), ("S-24", 46_916_200),
    ("S-36", 68_366_632), ("M-36", 271_221_352), ("M-48", 356_460_520)])
def test_variant_parameter_counts(variant, count):
  """timm's counts of the released models at their resolutions (1000 classes)."""
  import jax.numpy as jnp
  model = create_model(f"CaiT-{variant}", num_classes=1000)
  size = CAIT[variant]["resolution"]
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)) == count
  assert model.layer_scale_init == (1e-6 if variant in ("S-36", "M-36", "M-48") else 1e-5)


def test_logits_match_the_torch_reference_and_import_back_bit_exact():
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref
  model = CaiT(**SMALL)
  x = images()
  params = random_params(model, x, rng=1)  # gammas, talking-heads mixing and class token all perturbed
  sd = cait_interop.timm_state_dict(params, SMALL)
  theirs = ref.CaiT(grid=GRID, patch=4, dim=32, depth=2, heads=4, hidden=48, num_classes=5).eval()
  theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    want = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got, out = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True))(params, x)
  assert np.max(np.abs(np.asarray(got) - want)) <= 2e-5 and np.std(want) > 0.1
  assert out["attention_weights"].shape == (2, 2, 4, 6, 6)
  assert out["class_attention_weights"].shape == (2, 2, 4, 1, 7)
  np.testing.assert_allclose(np.asarray(out["class_attention_weights"]).sum(-1), 1.0, atol=1e-5)

  # Back from the release's names (with its `module.` prefix): the same settings and bits.
  back, settings, _ = cait_interop.from_timm({f"module.{k}": v for k, v in sd.items()}, {"num_heads": 4},
                                          image_size=(12, 8))
  assert settings["family"] == "cait" and settings["depth"] == 2 and settings["class_depth"] == 2
  mine, read = flatten(params), flatten(back)
  assert sorted(mine) == sorted(read) and all(np.array_equal(np.asarray(mine[k]), read[k]) for k in mine)


def test_scan_matches_unrolled():
  from vit_jax.models.encoder import unrolled_to_scan
  x = images(2)
  params = random_params(CaiT(**SMALL), x, rng=2)
  want, _ = CaiT(**SMALL).apply({"params": params}, x)
  got, _ = CaiT(**SMALL, scan=True).apply({"params": unrolled_to_scan(params)}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.slow
def test_cait_trains_through_the_trainer_with_layer_decay_on_a_tensor_mesh(tmp_path):
  from configs.vit import get_config
  from vit_jax.train import optim, trainer
  c = get_config("runlocal")
  c.model = dict(family="cait", patch_size=2, width=16, depth=2, num_heads=2, mlp_dim=32, channels=1,
                 drop_path_rate=0.1)
  c.optim.layer_decay = 0.75
  c.mesh = (("data", 4), ("tensor", 2))  # heads (and the talking-heads mixing across them) split over `tensor`
  c.data.data_dir = str(tmp_path / "tfds")
  final = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  params = random_params(CaiT(**{k: v for k, v in c.model.items() if k != "family"}, num_classes=10),
                         np.zeros((1, 8, 8, 1), np.float32))
  ids = optim.layer_ids(params)
  assert ids["embedding/kernel"] == 0 and ids["cls"] == 0 and ids["Transformer/posembed_input/pos_embedding"] == 0
  assert ids["Transformer/encoderblock_1/LayerScale_0/gamma"] == 2
  assert ids["class_block_0/attention/query/kernel"] == 3 and ids["class_block_1/MlpBlock_0/Dense_0/kernel"] == 4
  assert ids["head/kernel"] == ids["norm/scale"] == 5


def test_release_files_load_fine_tune_at_a_new_size_and_convert(tmp_path):
  torch = pytest.importorskip("torch")
  from vit_jax import checkpoint
  from vit_jax.interop import convert, load_pretrained, load_variables, resize_posemb
  settings = dict(SMALL, patch_size=4)
  params = random_params(CaiT(**settings), np.zeros((1, 16, 16, 3), np.float32), rng=3)
  sd = {f"module.{k}": torch.from_numpy(np.array(v)) for k, v in cait_interop.timm_state_dict(params, settings).items()}
  torch.save({"model": sd, "optimizer": {}, "epoch": 3}, tmp_path / "cait.pth")  # as the release saves it
  variables, saved = load_variables(tmp_path / "cait.pth", hints={"num_heads": 4})
  assert saved["model"]["family"] == "cait" and saved["image_size"] == [16, 16]
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(variables["params"]),
                                                               jax.tree_util.tree_leaves(params)))

  # Fine-tuning at 24 px: the patches-only table is resized to 6x6 (no class-token row), the head reset.
  init = random_params(CaiT(**dict(settings, num_classes=3)), np.zeros((1, 24, 24, 3), np.float32), rng=5)
  got = load_pretrained(str(tmp_path / "cait.pth"), init, reinit_head=True)
  table = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(got["Transformer"]["posembed_input"]["pos_embedding"],
                             resize_posemb(table, (6, 6), num_prefix_tokens=0), atol=1e-6)
  np.testing.assert_array_equal(got["head"]["kernel"], init["head"]["kernel"])

  # convert: orbax and a timm folder (read back with its config's heads), not Hugging Face (no CaiT there).
  convert.convert(str(tmp_path / "cait.pth"), "orbax", str(tmp_path / "orbax"), config={"num_heads": 4})
  assert checkpoint.load(tmp_path / "orbax")[1]["model"]["family"] == "cait"
  convert.convert(str(tmp_path / "orbax"), "timm", str(tmp_path / "timm"))
  back, saved = load_variables(tmp_path / "timm")
  assert saved["model"]["num_heads"] == 4
  assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(back["params"]),
                                                               jax.tree_util.tree_leaves(params)))
  with pytest.raises(ValueError, match="A CaiT converts to orbax or timm, not hf"):
    convert.convert(str(tmp_path / "orbax"), "hf", str(tmp_path / "hf"))
