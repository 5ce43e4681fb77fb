"""Swin V1 / V2: the window helpers against their definitions, parameter counts against the papers'
models, and logits / attention against Hugging Face's `Swin(v2)ForImageClassification` with every
parameter perturbed, on non-square inputs and maps the window does not divide."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import random_params
from vit_jax.interop import swin as swin_interop
from vit_jax.interop import torch_file
from vit_jax.interop.tree import flatten
from vit_jax.models import swin
from vit_jax.models.swin import SwinTransformer
from vit_jax.models.variants import create_model, swin_settings


def test_relative_position_index_is_the_offset_table_row():
  # (dh + w - 1) * (2w - 1) + (dw + w - 1) for a 2x2 window, written out.
  np.testing.assert_array_equal(swin.relative_position_index(2), [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3],
                                                                    [8, 7, 5, 4]])
  # A window smaller than the table reads its centre: the zero offset stays at the table's centre row.
  assert np.all(np.diag(swin.relative_position_index(3, table_window=7)) == 6 * 13 + 6)


def test_shift_mask_separates_the_regions_a_roll_brings_together():
  # 8x8 map, window 4, shift 2: region labels 0000 1122 (4 rows), 3333 4455 (2 rows), 6666 7788 (2 rows).
  rows = [[0, 0, 0, 0, 1, 1, 2, 2]] * 4 + [[3, 3, 3, 3, 4, 4, 5, 5]] * 2 + [[6, 6, 6, 6, 7, 7, 8, 8]] * 2
  labels = np.array(rows)
  windows = [labels[r:r + 4, c:c + 4].ravel() for r in (0, 4) for c in (0, 4)]
  expected = np.stack([np.where(w[:, None] == w[None, :], 0.0, -100.0) for w in windows])
  np.testing.assert_array_equal(swin.shift_mask(8, 8, 4, 2), expected)


def test_window_partition_round_trips_and_clipping_follows_the_smaller_side():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  w = swin.window_partition(x, 4)
  assert w.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(w[0, 1, :4, 0], x[0, 0, 4:8, 0])  # window (0, 1), its first row
  np.testing.assert_array_equal(swin.window_reverse(w, 4, 8, 12), x)
  assert swin.clip_window((4, 6), 7, 3) == (4, 0) and swin.clip_window((8, 9), 7, 3) == (7, 3)


COUNTS = {  # 1000 classes; Swin: the papers' 28M / 50M / 88M / 197M, exactly as timm and Hugging Face count
    ("Swin-T", 224): 28_288_354, ("Swin-S", 224): 49_606_258, ("Swin-B", 224): 87_768_224,
    ("Swin-B-w12", 384): 87_903_584, ("Swin-L", 224): 196_532_476,
    ("SwinV2-T", 256): 28_347_154, ("SwinV2-S", 256): 49_728_418, ("SwinV2-B", 256): 87_918_816,
    ("SwinV2-B-w16", 256): 87_918_816}


@pytest.mark.parametrize("variant, size", sorted(COUNTS), ids=[f"{v}@{r}" for v, r in sorted(COUNTS)])
def test_variant_parameter_counts(variant, size):
  model = create_model(variant, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"])) == COUNTS[(variant, size)]
  assert swin_settings(variant)["family"] == "swin"


CASES = {  # name: (version, image size, depths, heads, window, pretrained windows)
    "v1-clipped-last-stage": (1, (64, 64), (2, 2, 2), (2, 4, 8), 4, None),
    "v1-wide-padded": (1, (64, 96), (2, 2), (2, 4), 5, None),
    "v1-tall-padded": (1, (96, 64), (2, 2), (2, 4), 5, None),
    "v2-clipped-last-stage": (2, (64, 64), (2, 2, 2), (2, 4, 8), 4, None),
    "v2-wide-padded": (2, (64, 96), (2, 2), (2, 4), 5, None),
    "v2-pretrained-window": (2, (64, 96), (2, 2, 2), (2, 4, 8), 5, [3, 3, 3]),
}


def hf_model(version, size, depths, heads, window, pretrained):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  kw = dict(image_size=list(size), patch_size=4, embed_dim=16, depths=list(depths), num_heads=list(heads),
            window_size=window, num_labels=5, layer_norm_eps=1e-5, drop_path_rate=0.0)
  if pretrained:
    kw["pretrained_window_sizes"] = pretrained
  v2 = version == 2
  config = (transformers.Swinv2Config if v2 else transformers.SwinConfig)(**kw)
  config._attn_implementation = "eager"  # the path that returns attention weights
  torch.manual_seed(0)
  model = (transformers.Swinv2ForImageClassification if v2 else transformers.SwinForImageClassification)(config)
  with torch.no_grad():
    for p in model.parameters():  # every parameter away from its initial value (bias tables, logit scales too)
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hugging_face_swin_logits_and_attention(tmp_path, case):
  import torch
  version, size, *_ = CASES[case]
  theirs = hf_model(*CASES[case])
  theirs.save_pretrained(tmp_path)  # the hub's names
  torch.save(theirs.state_dict(), tmp_path / "in_memory_names.pth")  # transformers 5's names
  config = json.loads((tmp_path / "config.json").read_text())
  images = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_attentions=True)
  for weights in ("model.safetensors", "in_memory_names.pth"):
    params, settings, got_size = swin_interop.from_hf(torch_file.load(tmp_path / weights), config)
    assert got_size == size and settings["version"] == version
    logits, out = SwinTransformer(**settings).apply({"params": params}, images, return_attention=True)
    assert np.max(np.abs(np.asarray(logits) - ref.logits.numpy())) <= 2e-5, weights
  # Hugging Face returns each stage's last block: stage 0's second block is the shifted one.
  ours = np.asarray(out["attention_weights"][1])
  assert np.max(np.abs(ours.reshape(-1, *ours.shape[2:]) - ref.attentions[0].numpy())) <= 1e-5
  assert [f.shape[1:3] for f in out["stages"]] == [(size[0] // 4 >> i, size[1] // 4 >> i) for i in range(len(out["stages"]))]


@pytest.mark.parametrize("version", [1, 2])
def test_export_then_import_is_bit_exact(version):
  settings = dict(num_classes=5, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4, version=version,
                  pretrained_window_size=(3, 0) if version == 2 else 0)
  images = np.zeros((1, 32, 48, 3), np.float32)
  params = random_params(SwinTransformer(**settings), images)
  sd = swin_interop.hf_state_dict(params, settings)
  back, got, size = swin_interop.from_hf(sd, swin_interop.hf_config(settings, (32, 48)))
  assert size == (32, 48) and got["pretrained_window_size"] == tuple(np.broadcast_to(settings["pretrained_window_size"], 2))
  a, b = flatten(params), flatten(back)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k], np.float32).tobytes(), k


@pytest.mark.slow
@pytest.mark.parametrize("variant, size", [("Swin-T", 224), ("Swin-S", 224), ("Swin-B", 224), ("Swin-L", 224),
                                           ("SwinV2-T", 256), ("SwinV2-S", 256), ("SwinV2-B", 256)])
def test_released_sizes_have_hugging_face_key_sets(variant, size):
  """Every tensor of the full-size Hugging Face model, by name and shape, and nothing else (shapes only)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  s = swin_settings(variant)
  s.pop("family")
  s = dict(s, num_classes=1000, drop_path_rate=0.0)
  cfg = swin_interop.hf_config(s, size)
  cls = getattr(transformers, cfg["architectures"][0])
  with torch.device("meta"):
    theirs = cls(getattr(transformers, "Swinv2Config" if s["version"] == 2 else "SwinConfig")(**{
        k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "dtype")}))
  expected = {k: tuple(v.shape) for k, v in swin_interop.hf_legacy_names(theirs.state_dict()).items()}
  model = SwinTransformer(**s)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
  zeros = jax.tree_util.tree_map(lambda a: np.broadcast_to(np.float32(0), a.shape), shapes)
  ours = {k: v.shape for k, v in swin_interop.hf_state_dict(zeros, s).items()}
  assert sorted(set(ours) ^ set(expected)) == []
  assert {k: tuple(v) for k, v in ours.items()} == expected


def test_convert_and_fine_tune_from_hugging_face_swin_folders(tmp_path):
  from vit_jax import checkpoint
  from vit_jax.interop import convert, load_pretrained
  settings = dict(num_classes=5, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4, version=2)
  images = np.zeros((1, 32, 32, 3), np.float32)
  params = random_params(SwinTransformer(**settings), images)
  swin_interop.save_hf(params, settings, tmp_path / "hf", 32)
  assert convert.main(["--input", str(tmp_path / "hf"), "--to", "orbax", "--output", str(tmp_path / "o")]) == 0
  back, saved = checkpoint.load(tmp_path / "o")
  assert saved["model"]["family"] == "swin" and saved["image_size"] == [32, 32]
  assert all(np.array_equal(v, flatten(params)[k]) for k, v in flatten(back).items())
  assert convert.main(["--input", str(tmp_path / "hf"), "--to", "timm", "--output", str(tmp_path / "t")]) == 2
  # Fine-tuning on 3 classes: everything but the head comes from the folder.
  init = random_params(SwinTransformer(**dict(settings, num_classes=3)), images, rng=1)
  loaded = load_pretrained(str(tmp_path / "hf"), init, reinit_head=True)
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(loaded["stage_1"]["block_0"]["attention"]["logit_scale"],
                                params["stage_1"]["block_0"]["attention"]["logit_scale"])


@pytest.mark.slow
def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def swin_teacher(tmp_path_factory):
  """A Swin classifier saved as the trainer saves one (random weights: the tests check the plumbing)."""
  from vit_jax import checkpoint
  settings = dict(num_classes=10, patch_size=1, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, channels=1)
  params = random_params(SwinTransformer(**settings), np.zeros((1, 8, 8, 1), np.float32), rng=3)
  path = tmp_path_factory.mktemp("swin_teacher") / "teacher"
  checkpoint.save(path, params, config={"model": dict(settings, family="swin")})
  return str(path), settings, params


def test_swin_distils_through_its_class_head(swin_teacher):
  from configs.swin import get_config
  from vit_jax.train import tasks
  path, t_settings, t_params = swin_teacher
  c = get_config(f"teacher={path},distill=hard,runlocal")
  c.model.drop_path_rate = 0.0  # deterministic in train mode, so the loss can be recomputed
  task = tasks.TASKS[c.task](c, 10)
  assert isinstance(task.teacher, SwinTransformer) and list(task.teacher.depths) == [2]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((6, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 3, 9, 3, 7, 1])
  params = random_params(task.model, images)
  loss, (metrics, _) = jax.jit(lambda p, b: task.loss(p, {}, b, jax.random.key(1), task.constants))(
      params, {"image": images, "label": labels})
  student, _ = jax.jit(task.model.apply)({"params": params}, images)
  teacher, _ = jax.jit(SwinTransformer(**t_settings).apply)({"params": t_params}, images)
  smooth = np.eye(10)[labels] * (1 - c.label_smoothing) + c.label_smoothing / 10
  ls = log_softmax(student)
  want = np.mean(0.5 * -(smooth * ls).sum(-1) + 0.5 * -ls[np.arange(6), np.argmax(teacher, -1)])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["train/teacher_agreement"]),
                             np.mean(np.argmax(student, -1) == np.argmax(teacher, -1)))
  with pytest.raises(ValueError, match="Swin has no distillation token: set model.distilled=False"):
    tasks.build_classifier(dict(c.model.to_dict(), num_classes=10, distilled=True))


@pytest.mark.slow
def test_configs_swin_distils_through_the_trainer_with_layer_decay(tmp_path, swin_teacher):
  from configs.swin import get_config
  from vit_jax.train import optim, trainer
  c = get_config(f"version=2,teacher={swin_teacher[0]},distill=soft,runlocal")
  c.update(dict(num_devices=1, batch_size=16))
  c.model.update(dict(depths=(2, 1), num_heads=(2, 4)))  # a shifted block, a merge and a clipped stage
  c.optim.layer_decay = 0.75
  c.data.data_dir = str(tmp_path / "tfds")
  final = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert any("train/teacher_agreement" in r for r in rows)
  params = random_params(SwinTransformer(**{k: v for k, v in c.model.to_dict().items() if k != "family"},
                                         num_classes=10), np.zeros((1, 8, 8, 1), np.float32))
  ids = optim.layer_ids(params)
  assert ids["embedding/kernel"] == 0 and ids["stage_0/block_1/MlpBlock_0/Dense_0/kernel"] == 2
  assert ids["stage_0/merge/reduction/kernel"] == 2 and ids["stage_1/block_0/attention/query/kernel"] == 3
  assert ids["head/kernel"] == 4


def test_fine_tuning_at_a_new_window_resizes_v1_bias_tables_as_torch_bicubic(tmp_path):
  torch = pytest.importorskip("torch")
  from vit_jax import checkpoint
  from vit_jax.interop import load_pretrained
  settings = dict(num_classes=5, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4)
  params = random_params(SwinTransformer(**settings), np.zeros((1, 32, 32, 3), np.float32))
  checkpoint.save(tmp_path / "w4", params, config={"model": dict(settings, family="swin")})
  bigger = dict(settings, window_size=6)
  init = random_params(SwinTransformer(**bigger), np.zeros((1, 48, 48, 3), np.float32), rng=1)
  got = load_pretrained(str(tmp_path / "w4"), init)["stage_0"]["block_1"]["relative_position_bias"]["table"]
  old = params["stage_0"]["block_1"]["relative_position_bias"]["table"]  # [49, 2] -> [121, 2]
  ref = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(old).T.reshape(1, 2, 7, 7).copy()), size=(11, 11),
                                        mode="bicubic", align_corners=False)[0].reshape(2, -1).T.numpy()
  assert got.shape == (121, 2) and np.max(np.abs(got - ref)) <= 1e-5


def test_window_maps_put_each_windows_attention_back_on_the_map():
  from vit_jax.evaluate.attention_maps import window_maps
  settings = dict(num_classes=3, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, channels=1)
  images = np.random.default_rng(0).standard_normal((1, 24, 20, 1)).astype(np.float32)  # a 6x5 map: padded
  params = random_params(SwinTransformer(**settings), images)
  _, out = SwinTransformer(**settings).apply({"params": params}, images, return_attention=True)
  window, shift = swin.clip_window((6, 5), 4, 2)
  maps = window_maps(out["attention_weights"][1], (6, 5), window, shift)
  assert maps.shape == (1, 2, 6, 5)
  # Each window's centre query attends only within its window, and its row sums to 1 over the window
  # (positions that fall into the padding take the rest).
  w = np.asarray(out["attention_weights"][1])
  assert np.allclose(w.sum(-1), 1.0, atol=1e-5)
  rolled = np.roll(np.pad(maps, ((0, 0), (0, 0), (0, 2), (0, 3))), (-shift, -shift), axis=(2, 3))
  per_window = rolled.reshape(1, 2, 2, 4, 2, 4).sum(axis=(3, 5))
  assert np.all(per_window <= 1.0 + 1e-5) and np.all(per_window > 0.0)


def test_window_maps_place_rows_by_window_and_undo_the_shift():
  from vit_jax.evaluate.attention_maps import window_maps
  rng = np.random.default_rng(3)
  weights = rng.random((1, 4, 1, 16, 16)).astype(np.float32)  # an 8x8 map in 2x2 windows of 4x4
  q = 2 * 4 + 2
  plain = window_maps(weights, (8, 8), 4, 0)
  for k, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
    np.testing.assert_array_equal(plain[0, 0, r:r + 4, c:c + 4], weights[0, k, 0, q].reshape(4, 4))
  shifted = window_maps(weights, (8, 8), 4, 2)
  np.testing.assert_array_equal(shifted, np.roll(plain, (2, 2), axis=(2, 3)))
  assert window_maps(weights[:, :, :, :, :], (7, 6), 4, 0).shape == (1, 1, 7, 6)  # padding cropped


@pytest.mark.parametrize("size", [(8, 8), (6, 5)])
def test_window_groups_are_exactly_who_attends_whom(size):
  from vit_jax.evaluate.attention_maps import window_groups
  settings = dict(num_classes=3, patch_size=1, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, channels=1)
  images = np.random.default_rng(1).standard_normal((1, *size, 1)).astype(np.float32)
  params = random_params(SwinTransformer(**settings), images)
  _, out = SwinTransformer(**settings).apply({"params": params}, images, return_attention=True)
  h, w = size
  hp, wp = h + (-h) % 4, w + (-w) % 4
  for block, shift in ((0, 0), (1, 2)):
    weights = np.asarray(out["attention_weights"][block])[0, :, 0]  # [windows, N, N], head 0
    groups = window_groups(size, 4, shift)
    assert groups.shape == size

    def where(i, j):  # (window, index in window) of map position (i, j) after the roll by -shift
      ri, rj = (i - shift) % hp, (j - shift) % wp
      return (ri // 4) * (wp // 4) + rj // 4, (ri % 4) * 4 + rj % 4

    for i in range(h):
      for j in range(w):
        win, q = where(i, j)
        attends = np.zeros(size, bool)
        for a in range(h):
          for b in range(w):
            win_k, k = where(a, b)
            attends[a, b] = win_k == win and weights[win, q, k] > 1e-20
        np.testing.assert_array_equal(attends, groups == groups[i, j], err_msg=f"block {block}, query {(i, j)}")
  assert len(np.unique(window_groups((8, 8), 4, 2))) == 9 and len(np.unique(window_groups((8, 8), 4, 0))) == 4
