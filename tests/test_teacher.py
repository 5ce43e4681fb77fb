"""DeiT distillation and LV-ViT token labeling: losses, score maps, MixToken, and both tasks in the trainer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs
from tests.helpers import perturb
from vit_jax.data import input_pipeline, preprocess, score_maps
from vit_jax.models.vit import VisionTransformer
from vit_jax.train import losses

TOL = 1e-5


def log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- losses

def test_hard_distillation_against_hand_computed_values():
  student = np.array([[2.0, 0.0, -1.0]])
  dist = np.array([[0.0, 1.0, 0.0]])
  teacher = np.array([[0.1, 0.3, 0.2]])  # argmax 1
  y = np.array([[1.0, 0.0, 0.0]])
  # 1/2 CE(student, class 0) + 1/2 CE(dist head, teacher's class 1)
  ce_s = np.log(np.exp(2) + 1 + np.exp(-1)) - 2
  ce_d = np.log(1 + np.e + 1) - 1
  want = 0.5 * ce_s + 0.5 * ce_d
  got = losses.hard_distillation(student, dist, y, teacher)
  np.testing.assert_allclose(got, [want], rtol=TOL)
  assert abs(want - 0.5 * (0.1698460196 + 0.5514447139)) < 1e-9  # the same numbers written out


def test_soft_distillation_against_hand_computed_values():
  rng = np.random.default_rng(0)
  student, dist, teacher = (rng.standard_normal((4, 6)) for _ in range(3))
  y = np.eye(6)[[0, 3, 5, 1]] * 0.9 + 0.1 / 6  # smoothed labels
  alpha, tau = 0.3, 2.5
  ce = -(y * log_softmax(student)).sum(-1)
  pt, ps = log_softmax(teacher / tau), log_softmax(dist / tau)
  kl = (np.exp(pt) * (pt - ps)).sum(-1)
  want = (1 - alpha) * ce + alpha * tau ** 2 * kl
  got = losses.soft_distillation(student, dist, y, teacher, alpha=alpha, tau=tau)
  np.testing.assert_allclose(got, want, rtol=TOL)
  # The KL term vanishes when the student's distillation head equals the teacher.
  same = losses.soft_distillation(student, teacher, y, teacher, alpha=alpha, tau=tau)
  np.testing.assert_allclose(same, (1 - alpha) * ce, rtol=TOL)


def test_token_labeling_loss_is_cls_ce_plus_beta_mean_token_ce():
  rng = np.random.default_rng(1)
  cls, tok = rng.standard_normal((2, 5)), rng.standard_normal((2, 7, 5))
  cls_t = rng.dirichlet(np.ones(5), 2)
  tok_t = rng.dirichlet(np.ones(5), (2, 7))
  want = -(cls_t * log_softmax(cls)).sum(-1) + 0.5 * (-(tok_t * log_softmax(tok)).sum(-1)).mean(-1)
  np.testing.assert_allclose(losses.token_labeling(cls, tok, cls_t, tok_t, 0.5), want, rtol=TOL)


# ----------------------------------------------------------------------------- score maps

def ramp_example(size=32, map_size=16):
  """An image whose two channels encode each pixel's row and column, and a score map of the same ramps."""
  r = (np.arange(size) + 0.5) / size
  image = np.stack(np.broadcast_arrays(r[:, None], r[None, :]), -1)
  image = np.round(255 * image).astype(np.uint8)
  m = (np.arange(map_size) + 0.5) / map_size
  values = np.stack(np.broadcast_arrays(m[:, None], m[None, :]))  # [k=2, H, W]: class 0 = row, class 1 = column
  indices = np.stack([np.zeros((map_size, map_size), np.int32), np.ones((map_size, map_size), np.int32)])
  return {"image": image, "label": 0, "score_values": values.astype(np.float32), "score_indices": indices,
          "geometry": preprocess.IDENTITY.copy()}


@pytest.mark.parametrize("pp,grid", [("inception_crop(16, area_min=25)|flip_lr", (4, 4)),
                                     ("resize(24)|central_crop(16, 20)|flip_lr", (4, 5))])
def test_score_map_crop_and_flip_land_where_the_image_crop_lands(pp, grid):
  """The augmented image itself says where each pixel came from; the cropped score map must agree."""
  ops = preprocess.parse(pp)
  flips = set()
  for seed in range(12):
    ex = preprocess.apply(ops, ramp_example(), np.random.default_rng(seed))
    flips.add(bool(ex["geometry"][3] < 0))
    img = ex["image"].astype(np.float64) / 255  # [h, w, 2]: original (row, column) of every pixel
    h, w = img.shape[:2]
    want = img.reshape(grid[0], h // grid[0], grid[1], w // grid[1], 2).mean((1, 3)).reshape(-1, 2)
    cls, tokens = score_maps.aligned_logits(ex["score_values"][None], ex["score_indices"][None],
                                            ex["geometry"][None], grid, num_classes=2)
    np.testing.assert_allclose(tokens[0], want, atol=0.03, err_msg=f"seed {seed}, geometry {ex['geometry']}")
    np.testing.assert_allclose(cls[0], want.mean(0), atol=0.03)
  assert flips == {True, False}  # both orientations were checked


def test_targets_are_softmax_of_the_aligned_logits_with_smoothing():
  ex = ramp_example(8, 4)
  batch = {k: jnp.asarray(ex[k])[None] for k in ("score_values", "score_indices", "geometry")}
  cls, tokens = score_maps.token_targets(batch, (2, 2), 3, label_smoothing=0.1)
  cls_l, tok_l = score_maps.aligned_logits(batch["score_values"], batch["score_indices"], batch["geometry"], (2, 2), 3)
  p = np.exp(log_softmax(tok_l))
  np.testing.assert_allclose(tokens, 0.9 * p + 0.1 / 3, rtol=1e-5)
  np.testing.assert_allclose(np.sum(cls, -1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(tokens)[..., 2] > 0)  # classes outside the top-k keep logit 0, so some mass


def test_teacher_dense_logits_average_to_its_image_logits():
  model = VisionTransformer(num_classes=6, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64,
                            pool_type="gap", head_zeroinit=False)
  x = np.random.default_rng(2).standard_normal((3, 16, 12, 3)).astype(np.float32)
  variables = perturb(model.init(jax.random.key(0), x), scale=0.3)
  dense = score_maps.dense_logits(model, variables, x)
  assert dense.shape == (3, 4, 3, 6)
  np.testing.assert_allclose(dense.mean((1, 2)), model.apply(variables, x)[0], rtol=1e-4, atol=1e-5)
  maps = score_maps.top_k_maps(dense, 2)
  assert maps.shape == (3, 2, 2, 4, 3)
  np.testing.assert_array_equal(maps[:, 1, 0], np.argmax(dense, -1))
  with pytest.raises(ValueError, match="pool_type='gap'"):
    token_model = VisionTransformer(num_classes=6, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
    score_maps.dense_logits(token_model, token_model.init(jax.random.key(0), x), x)


# ----------------------------------------------------------------------------- MixToken and LV-ViT

PARTNERS = [1, 0, 3, 2]  # MixToken's partner images in a batch of 4: rows 2k and 2k + 1 swap


def test_mixtoken_box_follows_the_cutmix_rule():
  for seed in range(20):
    rng = jax.random.key(seed)
    box, kept = losses.mixtoken_box(rng, (7, 5))
    r_lam, r_y, r_x = jax.random.split(rng, 3)
    lam = float(jax.random.beta(r_lam, 1.0, 1.0))
    cy, cx = int(jax.random.randint(r_y, (), 0, 7)), int(jax.random.randint(r_x, (), 0, 5))
    ch, cw = int(7 * np.sqrt(1 - lam)), int(5 * np.sqrt(1 - lam))
    want = [min(max(cy - ch // 2, 0), 7), min(max(cx - cw // 2, 0), 5),
            min(max(cy + ch // 2, 0), 7), min(max(cx + cw // 2, 0), 5)]
    assert np.asarray(box).tolist() == want
    assert np.isclose(float(kept), 1 - (want[2] - want[0]) * (want[3] - want[1]) / 35)


def test_mixtoken_mixes_after_the_stem_and_unmixes_token_predictions():
  """With a patch stem, swapping a patch-aligned pixel box equals MixToken on the token grid."""
  model = VisionTransformer(num_classes=5, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                            token_head=True, head_zeroinit=False)
  x = np.random.default_rng(3).standard_normal((4, 16, 20, 3)).astype(np.float32)
  variables = perturb(model.init(jax.random.key(0), x), scale=0.3)
  box = (1, 2, 3, 5)  # rows 1..2, columns 2..4 of the 4x5 grid
  _, out = model.apply(variables, x, mix_box=jnp.array(box))
  mixed = x.copy()
  mixed[:, 4:12, 8:20] = x[PARTNERS, 4:12, 8:20]
  _, direct = model.apply(variables, mixed)
  np.testing.assert_allclose(out["logits_cls"], direct["logits_cls"], rtol=1e-5, atol=1e-5)
  tokens = np.asarray(direct["token_logits"]).reshape(4, 4, 5, 5)
  unmixed = tokens.copy()
  unmixed[:, 1:3, 2:5] = tokens[PARTNERS, 1:3, 2:5]  # each position back with the image its content came from
  np.testing.assert_allclose(out["token_logits"], unmixed.reshape(4, 20, 5), rtol=1e-5, atol=1e-5)
  assert np.asarray(out["mix_mask"]).sum() == 6


def test_token_labeling_task_loss_against_a_direct_computation():
  """The task's MixToken batch loss: pixel-space mixing, manual un-mixing, area-weighted class targets."""
  from vit_jax.train.tasks import TokenLabeling
  model = dict(num_classes=5, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, token_head=True,
               head_zeroinit=False)
  task = TokenLabeling({"model": model, "token_label": dict(beta=0.5, mixtoken=True, label_smoothing=0.1)}, 5)
  r = np.random.default_rng(5)
  images = r.standard_normal((4, 16, 16, 3)).astype(np.float32)
  batch = {"image": images, "label": np.array([0, 1, 2, 3]),
           "score_values": r.standard_normal((4, 2, 4, 4)).astype(np.float32),
           "score_indices": r.integers(0, 5, (4, 2, 4, 4)).astype(np.int32),
           "geometry": np.tile(preprocess.IDENTITY, (4, 1))}
  variables = perturb(task.init(jax.random.key(0), images), scale=0.3)
  seed = next(s for s in range(100) if 0 < 1 - float(losses.mixtoken_box(
      jax.random.split(jax.random.key(s))[0], (4, 4))[1]) < 1)  # a non-empty box
  rng = jax.random.key(seed)
  loss, _ = task.loss(variables["params"], {}, batch, rng)

  box, kept = losses.mixtoken_box(jax.random.split(rng)[0], (4, 4))
  t, l, b, rt = (int(v) for v in box)
  mixed = images.copy()
  mixed[:, 4 * t:4 * b, 4 * l:4 * rt] = images[PARTNERS, 4 * t:4 * b, 4 * l:4 * rt]
  _, out = task.model.apply(variables, mixed)
  tokens = np.array(out["token_logits"]).reshape(4, 4, 4, 5)
  tokens[:, t:b, l:rt] = tokens[PARTNERS, t:b, l:rt].copy()
  cls_t, tok_t = (np.asarray(a, np.float64) for a in score_maps.token_targets(batch, (4, 4), 5, 0.1))
  kept = float(kept)
  cls_t = kept * cls_t + (1 - kept) * cls_t[PARTNERS]
  ce = lambda z, q: -(q * log_softmax(z)).sum(-1)
  want = np.mean(ce(out["logits_cls"], cls_t) + 0.5 * ce(tokens.reshape(4, 16, 5), tok_t).mean(-1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_token_head_inference_adds_half_the_per_class_max_over_tokens():
  model = VisionTransformer(num_classes=5, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64,
                            token_head=True, head_zeroinit=False)
  x = np.random.default_rng(4).standard_normal((2, 8, 8, 3)).astype(np.float32)
  variables = perturb(model.init(jax.random.key(0), x), scale=0.3)
  logits, out = model.apply(variables, x)
  np.testing.assert_allclose(logits, out["logits_cls"] + 0.5 * np.max(out["token_logits"], 1), rtol=1e-6)


def test_lvvit_s_stem_and_parameter_count():
  assert abs(model_configs.count_params("LV-ViT-S") - 26.15e6) / 26.15e6 < 0.02  # published 26M (26.15M)
  assert model_configs.count_params("LV-ViT-T") == pytest.approx(8.53e6, rel=0.02)
  model = model_configs.create_model("LV-ViT-S")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  p = shapes["params"]
  assert p["stem"]["Conv_0"]["kernel"].shape == (7, 7, 3, 64)
  assert p["embedding"]["kernel"].shape == (8, 8, 64, 384)  # the remaining 8x8 stride of patch 16
  assert "bias" not in p["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3)))[1], shapes)
  assert out["stem"].shape == (2, 14, 14, 384) and out["token_logits"].shape == (2, 196, 1000)
  with pytest.raises(ValueError, match="LV-ViT-T/S/M/L"):
    model_configs.get_config("LV-ViT-XL")


# ----------------------------------------------------------------------------- data

def test_repeated_augmentation_order():
  data = list(range(10))
  ra = input_pipeline.RepeatedAugmentation(data, 3, seed=0)
  epoch0 = [ra[i] for i in range(10)]
  assert epoch0[:3] == [epoch0[0]] * 3 and epoch0[3:6] == [epoch0[3]] * 3  # copies side by side
  assert len(set(epoch0)) == 4  # ceil(10 / 3) distinct images in an epoch of the usual length
  epoch1 = [ra[i] for i in range(10, 20)]
  assert epoch1 != epoch0 and [ra[i] for i in range(10)] == epoch0  # reshuffled per epoch, deterministic


# ----------------------------------------------------------------------------- tasks in the trainer

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  from configs import vit
  from vit_jax.train import trainer
  root = tmp_path_factory.mktemp("teacher")
  c = vit.get_config()
  c.update(dict(total_steps=40, log_steps=20, eval_steps=40, checkpoint_steps=40, num_devices=1))
  c.model.update(dict(width=16, depth=1, mlp_dim=32, num_heads=2, stem_width=8))
  c.data.data_dir = str(root / "tfds")
  trainer.train_and_evaluate(c, str(root / "work"))
  return str(root / "work"), str(root / "tfds")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distillation_trains_with_a_teacher_checkpoint_and_ema(tmp_path, teacher_dir, kind):
  from configs import deit
  from vit_jax.train import trainer
  teacher, data_dir = teacher_dir
  c = deit.get_config(f"teacher={teacher},distill={kind}")
  c.update(dict(total_steps=6, log_steps=3, eval_steps=6, checkpoint_steps=6, num_devices=1, batch_size=16,
                ema_decay=0.5))
  c.model.update(dict(width=16, depth=1, mlp_dim=32, num_heads=2))
  c.data.data_dir = data_dir
  c.data.repeated_augmentation = 3
  final = trainer.train_and_evaluate(c, str(tmp_path))
  assert {"eval/accuracy", "eval_ema/accuracy"} <= set(final)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("train/teacher_agreement" in r for r in rows)
  with pytest.raises(ValueError, match="predicts 10 classes, the data has 3"):
    from vit_jax.train import tasks
    tasks.load_teacher(teacher, 3)


@pytest.mark.slow
def test_token_labeling_trains_on_generated_score_maps(tmp_path, teacher_dir):
  from configs import lvvit
  from vit_jax.train import trainer
  teacher, data_dir = teacher_dir
  out = score_maps.generate(teacher, str(tmp_path / "maps"), data_dir=data_dir, k=3)
  meta = json.load(open(os.path.join(out, "meta.json")))
  assert meta["count"] == 1437 and meta["grid"] == [4, 4] and meta["k"] == 3
  maps = np.load(os.path.join(out, "score_maps.npy"))
  assert maps.shape == (1437, 2, 3, 4, 4) and maps.dtype == np.float16
  c = lvvit.get_config(f"score_maps={out}")
  c.update(dict(total_steps=6, log_steps=3, eval_steps=6, checkpoint_steps=6, num_devices=1, batch_size=16))
  c.model.update(dict(width=16, depth=1, mlp_dim=48, num_heads=2, stem_width=8))
  c.data.data_dir = data_dir
  final = trainer.train_and_evaluate(c, str(tmp_path / "work"))
  assert 0 <= final["eval/accuracy"] <= 1
  c.data.train_split = "train[:10%]"  # maps of another split are refused with the fix
  with pytest.raises(ValueError, match="regenerate them for this split"):
    trainer.train_and_evaluate(c, str(tmp_path / "other"))
