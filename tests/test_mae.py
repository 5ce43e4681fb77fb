"""MAE against Hugging Face ViTMAEForPreTraining with the same weights and noise, and its pieces."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from vit_jax.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from vit_jax.models.vit import posemb_sincos_2d

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.test_parity_hf import hf_block, linear  # noqa: E402

SIZE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, decoder_hidden_size=32,
            decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=64, image_size=32,
            patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", mask_ratio=0.75)


def reference(norm_pix_loss, seed=0):
  model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(norm_pix_loss=norm_pix_loss, **SIZE))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.2 * torch.randn_like(p))
    # The fixed sin-cos tables (HF 5.23 leaves them at zero on construction): the MAE formula.
    model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(np.asarray(posemb_sincos_2d(4, 4, 48, prefix_tokens=1))))
    model.decoder.decoder_pos_embed.copy_(torch.from_numpy(np.asarray(posemb_sincos_2d(4, 4, 32, prefix_tokens=1))))
  return model.eval()


def ours_from(model):
  sd = model.state_dict()
  t = lambda k: sd[k].detach().numpy()
  params = {
      "embedding": {"kernel": t("vit.embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
                    "bias": t("vit.embeddings.patch_embeddings.projection.bias")},
      "cls": t("vit.embeddings.cls_token"),
      "Transformer": {"encoder_norm": {"scale": t("vit.layernorm.weight"), "bias": t("vit.layernorm.bias")}},
      "decoder_embed": linear(sd, "decoder.decoder_embed"),
      "mask_token": t("decoder.mask_token"),
      "Decoder": {"encoder_norm": {"scale": t("decoder.decoder_norm.weight"), "bias": t("decoder.decoder_norm.bias")}},
      "decoder_pred": linear(sd, "decoder.decoder_pred"),
  }
  for i in range(2):
    params["Transformer"][f"encoderblock_{i}"] = hf_block(sd, f"vit.layers.{i}.", 48, 4)
    params["Decoder"][f"encoderblock_{i}"] = hf_block(sd, f"decoder.decoder_layers.{i}.", 32, 4)
  return params


def model(**kw):
  return MaskedAutoencoder(patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, decoder_width=32,
                           decoder_depth=2, decoder_heads=4, decoder_mlp_dim=64, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_matches_hugging_face_vitmae(norm_pix_loss):
  ref = reference(norm_pix_loss)
  rng = np.random.default_rng(1)
  images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  noise = rng.random((3, 16)).astype(np.float32)  # distinct values: argsort ties cannot differ
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), noise=torch.from_numpy(noise))
  loss, out = model(norm_pix_loss=norm_pix_loss).apply({"params": ours_from(ref)}, images, noise=noise)
  assert np.array_equal(np.asarray(out["mask"]), want.mask.numpy())
  assert np.array_equal(np.asarray(out["ids_restore"]), want.ids_restore.numpy())
  assert np.max(np.abs(np.asarray(out["pred"]) - want.logits.numpy())) <= 2e-5
  assert abs(float(loss) - float(want.loss)) <= 1e-6 * max(1.0, abs(float(want.loss)))
  assert np.std(want.logits.numpy()) > 0.1


def test_masking_keeps_the_smallest_noise():
  noise = jnp.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
  x = jnp.arange(8.0).reshape(2, 4, 1)
  kept, mask, ids_restore = random_masking(x, 0.5, noise)
  assert kept[..., 0].tolist() == [[1.0, 3.0], [4.0, 6.0]]
  assert mask.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
  assert jnp.take_along_axis(jnp.argsort(noise, 1), ids_restore, 1).tolist() == [[0, 1, 2, 3]] * 2


def test_patchify_round_trip_and_order():
  images = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  patches = patchify(images, 4)
  assert patches.shape == (2, 6, 48)
  np.testing.assert_array_equal(patches[0, 1].reshape(4, 4, 3), images[0, :4, 4:8])  # row-major patches
  np.testing.assert_array_equal(unpatchify(patches, 4, (2, 3), 3), images)


def test_defaults_are_the_paper_decoder_and_the_mask_is_random_per_example():
  m = MaskedAutoencoder(patch_size=4, width=16, depth=1, num_heads=2)
  assert (m.decoder_width, m.decoder_depth, m.decoder_heads, m.mask_ratio) == (512, 8, 16, 0.75)
  images = jnp.zeros((2, 16, 16, 3))
  variables = m.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)
  loss, out = m.apply(variables, images, rngs={"masking": jax.random.key(2)})
  assert out["mask"].sum(1).tolist() == [12.0, 12.0] and not np.array_equal(out["mask"][0], out["mask"][1])
  assert "posembed_input" not in variables["params"]["Transformer"]  # fixed tables, not parameters


def test_mae_pretraining_runs_in_the_trainer_and_the_loss_falls(tmp_path):
  import json
  from configs.mae import get_config
  from vit_jax.train import trainer
  c = get_config()
  c.update(dict(total_steps=60, log_steps=20, eval_steps=60, checkpoint_steps=60, num_devices=1))
  c.data.data_dir = str(tmp_path / "tfds")
  final = trainer.train_and_evaluate(c, str(tmp_path / "work"))
  losses = [e["train/loss"] for e in map(json.loads, open(tmp_path / "work" / "metrics.jsonl")) if "train/loss" in e]
  assert losses[-1] < 0.8 * losses[0] and 0 < final["eval/loss"] < losses[0]


def test_mae_pretraining_on_a_tfds_dataset_by_name(tmp_path):
  import tensorflow_datasets as tfds
  from configs.mae import get_config
  from vit_jax.train import trainer
  c = get_config("runlocal")
  c.update(dict(total_steps=3, log_steps=3, eval_steps=3, checkpoint_steps=3, num_devices=1, batch_size=8))
  c.data.update(dict(name="mnist", data_dir=None, image_size=8, pp_train="decode|inception_crop(8, area_min=20)|"
                     "flip_lr|value_range(-1, 1)", pp_eval="decode|resize(8)|value_range(-1, 1)"))
  with tfds.testing.mock_data(num_examples=24):
    final = trainer.train_and_evaluate(c, str(tmp_path / "work"))
  assert set(final) == {"eval/loss"} and np.isfinite(final["eval/loss"]) and final["eval/loss"] > 0


def test_reconstruction_grid(tmp_path):
  from vit_jax.evaluate import reconstruct
  m = model(norm_pix_loss=True)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params = m.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)["params"]
  rows = reconstruct.reconstructions(m, params, images, rng=jax.random.key(2))
  mask = np.asarray(m.apply({"params": params}, images, rngs={"masking": jax.random.key(2)})[1]["mask"])
  visible = np.asarray(unpatchify(np.repeat(1 - mask[..., None], 192, -1), 8, (4, 4), 3)) > 0
  np.testing.assert_allclose(rows["pasted"][visible], images[visible], atol=1e-6)  # visible patches are the input
  np.testing.assert_allclose(rows["masked"][visible], images[visible], atol=1e-6)
  assert not np.allclose(rows["reconstruction"], images)
  png = reconstruct.save_png(reconstruct.grid_image(rows), str(tmp_path / "grid.png"))
  from PIL import Image
  assert Image.open(png).size == (4 * 98 + 2, 2 * 98 + 2)


@pytest.mark.slow
def test_pretrain_finetune_linear_probe_chain(tmp_path):
  """MAE pre-training, then fine-tuning and linear probing from its checkpoint, on a tiny config."""
  import json
  from configs.mae import get_config
  from vit_jax import checkpoint
  from vit_jax.interop.tree import flatten
  from vit_jax.train import trainer
  tiny = dict(total_steps=6, log_steps=3, eval_steps=6, checkpoint_steps=6, num_devices=1, batch_size=16)
  runs = {}
  for name, arg in (("pre", "runlocal"), ("ft", f"mode=finetune,init={tmp_path / 'pre'},split=train[:10%]"),
                    ("lp", f"mode=linear_probe,init={tmp_path / 'pre'},split=train[:10%]")):
    c = get_config(arg)
    c.update(tiny)
    c.model.depth = 1
    c.data.data_dir = str(tmp_path / "tfds")
    runs[name] = trainer.train_and_evaluate(c, str(tmp_path / name))
  assert set(runs["pre"]) == {"eval/loss"} and 0 <= runs["ft"]["eval/accuracy"] <= 1
  pre, lp = flatten(checkpoint.load(tmp_path / "pre")[0]), flatten(checkpoint.load(tmp_path / "lp")[0])
  for k in lp:  # linear probing moved nothing but the head
    if k.startswith("head/"):
      continue
    assert np.array_equal(lp[k], pre[k]), k
  assert "Decoder/encoder_norm/scale" in pre and not any(k.startswith("Decoder/") for k in lp)
  ft = flatten(checkpoint.load(tmp_path / "ft")[0])  # MAE fine-tuning: mean of patch tokens, then fc_norm
  assert "fc_norm/scale" in ft and "cls" in ft and "Transformer/encoder_norm/scale" not in ft
  assert json.loads((tmp_path / "lp" / "config.json").read_text())["model"]["head_batchnorm"] is True
  # The README's reconstruction command on the pre-trained run.
  from vit_jax.evaluate import reconstruct
  assert reconstruct.main(["--workdir", str(tmp_path / "pre"), "--num", "3"]) == 0
  from PIL import Image
  assert Image.open(tmp_path / "pre" / "reconstructions.png").size == (4 * 98 + 2, 3 * 98 + 2)
  assert reconstruct.main(["--workdir", str(tmp_path / "lp")]) == 2  # not an MAE run: a one-line error


@pytest.mark.slow
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_export_to_hugging_face_vitmae(tmp_path, norm_pix_loss):
  from tests.helpers import random_params
  from vit_jax.interop import hf_export
  m = model(norm_pix_loss=norm_pix_loss)
  rng = np.random.default_rng(3)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  noise = rng.random((2, 16)).astype(np.float32)
  params = random_params(m, images, noise=noise)
  loss, out = m.apply({"params": params}, images, noise=noise)
  settings = dict(patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, decoder_width=32, decoder_depth=2,
                  decoder_heads=4, decoder_mlp_dim=64, norm_pix_loss=norm_pix_loss)
  hf_export.save_mae(params, settings, tmp_path / "hf", image_size=32)
  ref, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  with torch.no_grad():
    want = ref.eval()(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                      noise=torch.from_numpy(noise))
  assert np.array_equal(np.asarray(out["mask"]), want.mask.numpy())
  assert np.max(np.abs(np.asarray(out["pred"]) - want.logits.numpy())) <= 2e-5
  assert abs(float(loss) - float(want.loss)) <= 1e-6 * max(1.0, abs(float(want.loss)))

