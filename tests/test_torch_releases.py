"""The papers' own PyTorch releases (MAE, DeiT, LV-ViT) and Hugging Face's ViTMAE, read without torch.

Each family's model is built in torch with the release's parameter names (`tests/torch_reference.py`,
or transformers' `ViTMAEForPreTraining`), every parameter and BatchNorm statistic perturbed, saved
as the releases are (`torch.save({"model": ..., "optimizer": ..., "args": Namespace(...)})`, a bare
`.pth.tar`, safetensors), and read back through `load_variables`: our logits, MAE predictions and
loss, and LV-ViT token logits must agree with torch's within 2e-5.  Export-then-import through
the release exporters is bit-exact.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import perturb
from vit_jax.interop import ParamMismatchError, load_pretrained, load_pretrained_variables, load_variables, official
from vit_jax.interop import hf_export, torch_import
from vit_jax.interop.tree import flatten
from vit_jax.models.mae import MaskedAutoencoder
from vit_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.torch_reference")

TOL = 2e-5
IMAGES = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
NCHW = torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())


def state_dict(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_release(path, sd, how="wrapped"):
  """As the releases save: wrapped with training state (MAE, DeiT), bare (LV-ViT), or safetensors."""
  path = pathlib.Path(path)
  if how == "safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  elif how == "wrapped":
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 7,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="vit", output_dir=pathlib.Path("o"))},
               path)
  else:
    torch.save(sd, path)
  return str(path)


def assert_close(ours, theirs, what):
  theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
  err = float(np.max(np.abs(np.asarray(ours) - theirs)))
  assert err <= TOL, f"{what}: max |difference| {err:.2e} > {TOL}"


def assert_bitwise(a, b):
  a, b = flatten(a), flatten(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.asarray(a[k]).tobytes() == np.asarray(b[k], np.float32).tobytes(), k


# ------------------------------------------------------------------------------------------ MAE

MAE_SIZE = dict(grid=(4, 4), patch=8, dim=48, depth=2, heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4)
NOISE = np.random.default_rng(6).random((2, 16)).astype(np.float32)


def our_mae(variables, saved):
  model = MaskedAutoencoder(**saved["model"])
  loss, out = model.apply(variables, jnp.asarray(IMAGES), noise=jnp.asarray(NOISE))
  return loss, out


@pytest.mark.parametrize("how, norm_pix", [("wrapped", False), ("safetensors", True)],
                         ids=["visualize-pth", "full-safetensors"])
def test_mae_release_with_decoder_gives_torch_predictions_and_loss(tmp_path, how, norm_pix):
  torch.manual_seed(0)
  theirs = ref.perturb_(ref.MAE(**MAE_SIZE, norm_pix_loss=norm_pix))
  path = save_release(tmp_path / ("mae.pth" if how == "wrapped" else "mae.safetensors"), state_dict(theirs), how)
  variables, saved = load_variables(path, hints=dict(num_heads=4, decoder_heads=4, norm_pix_loss=norm_pix))
  assert saved["task"] == "mae" and saved["image_size"] == [32, 32]
  loss, out = our_mae(variables, saved)
  with torch.no_grad():
    t_loss, t_pred, t_mask = theirs(NCHW, torch.from_numpy(NOISE))
  assert_close(out["mask"], t_mask, "mask")
  assert_close(out["pred"], t_pred, "predictions")
  assert_close(loss, t_loss, "loss")


def test_mae_release_encoders_pretrained_and_fine_tuned(tmp_path):
  """`mae_pretrain_*.pth` (encoder only, with or without `norm`) and `mae_finetuned_*.pth` (fc_norm)."""
  torch.manual_seed(1)
  full = ref.perturb_(ref.MAE(**MAE_SIZE))
  encoder = {k: v for k, v in state_dict(full).items() if not k.startswith(("decoder", "mask_token"))}
  torch_vit = ref.ViT(grid=(4, 4), patch=8, dim=48, depth=2, heads=4, hidden=192, num_classes=0)
  torch_vit.load_state_dict(encoder, strict=True)
  for keep_norm in (True, False):
    sd = encoder if keep_norm else {k: v for k, v in encoder.items() if not k.startswith("norm.")}
    variables, saved = load_variables(save_release(tmp_path / f"pre{keep_norm}.pth", sd), hints={"num_heads": 4})
    s = saved["model"]
    assert (s["posemb"], s["pool_type"], s["num_classes"], s["final_norm"]) == \
        ("sincos2d", "token", None, None if keep_norm else False)
    _, out = VisionTransformer(**s).apply(variables, IMAGES)
    with torch.no_grad():
      tokens = torch_vit(NCHW) if keep_norm else _unnormed(torch_vit)
    assert_close(out["encoded"], tokens, f"encoder tokens (norm={keep_norm})")

  # Fine-tuning: into MAE's fine-tuning model (fixed table, global pool + fc_norm) and into one with a
  # learned table, which starts from the sin-cos values.
  path = save_release(tmp_path / "pre.pth", {k: v for k, v in encoder.items() if not k.startswith("norm.")})
  for posemb in ("sincos2d", "learn"):
    model = VisionTransformer(num_classes=5, patch_size=8, width=48, depth=2, num_heads=4, posemb=posemb,
                              pool_type="gap", fc_norm=True, class_token=True, activation="gelu")
    init = perturb(model.init(jax.random.key(0), IMAGES)["params"])
    params = load_pretrained(path, init, reinit_head=True, dont_load=["^fc_norm/"])
    np.testing.assert_array_equal(params["cls"], encoder["cls_token"].numpy())
    if posemb == "learn":
      np.testing.assert_allclose(params["Transformer"]["posembed_input"]["pos_embedding"],
                                 encoder["pos_embed"].numpy(), rtol=0, atol=1e-6)

  # mae_finetuned_*.pth: global pool, fc_norm, no norm, a head.
  torch.manual_seed(2)
  tuned = ref.perturb_(ref.ViT(grid=(4, 4), patch=8, dim=48, depth=2, heads=4, hidden=192, num_classes=5,
                               global_pool=True))
  variables, saved = load_variables(save_release(tmp_path / "ft.pth", state_dict(tuned)), hints={"num_heads": 4})
  s = saved["model"]
  assert (s["pool_type"], s["fc_norm"], s["class_token"], s["posemb"]) == ("gap", True, True, "learn")
  with torch.no_grad():
    assert_close(VisionTransformer(**s).apply(variables, IMAGES)[0], tuned(NCHW), "fine-tuned MAE logits")


def _unnormed(vit):
  x = vit.patch_embed(NCHW)
  x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
  for blk in vit.blocks:
    x = blk(x)
  return x


def test_mae_release_round_trip_and_refusals():
  settings = dict(patch_size=8, width=48, depth=2, num_heads=4, decoder_width=32, decoder_depth=1, decoder_heads=4)
  model = MaskedAutoencoder(**settings)
  params = perturb(model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, IMAGES)["params"])
  sd = official.mae_state_dict(params, settings, (4, 4))
  variables, saved = torch_import.read(sd, hints=dict(num_heads=4, decoder_heads=4))
  assert_bitwise(variables["params"], params)
  sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 1e-3  # a learned table where the model has a fixed one
  with pytest.raises(ParamMismatchError, match=r"'decoder_pos_embed' with other values than the fixed sin-cos"):
    torch_import.read(sd, hints=dict(num_heads=4, decoder_heads=4))


@pytest.mark.slow
def test_transformers_vitmae_imports_with_its_predictions_and_loss(tmp_path):
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTMAEConfig(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, decoder_hidden_size=32,
      decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64, image_size=32,
      patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", norm_pix_loss=True)
  torch.manual_seed(3)
  theirs = transformers.ViTMAEForPreTraining(config)
  ref.perturb_(theirs)
  with torch.no_grad():  # the fixed tables, which perturb_ leaves alone, as MAE computes them
    theirs.vit.embeddings.position_embeddings.copy_(ref.sincos_table(48, (4, 4)))
    theirs.decoder.decoder_pos_embed.copy_(ref.sincos_table(32, (4, 4)))
  theirs.save_pretrained(tmp_path / "hf")
  torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  with torch.no_grad():
    out = theirs(pixel_values=NCHW, noise=torch.from_numpy(NOISE))
  for weights in ("model.safetensors", "pytorch_model.bin"):
    other = {"model.safetensors": "pytorch_model.bin", "pytorch_model.bin": "model.safetensors"}[weights]
    hidden = tmp_path / "hf" / other
    hidden.rename(tmp_path / other)
    try:
      variables, saved = load_variables(tmp_path / "hf")
    finally:
      (tmp_path / other).rename(hidden)
    assert saved["task"] == "mae" and saved["model"]["norm_pix_loss"] is True
    loss, ours = our_mae(variables, saved)
    assert_close(ours["pred"], out.logits, f"ViTMAE predictions ({weights})")
    assert_close(loss, out.loss, f"ViTMAE loss ({weights})")
  params = variables["params"]  # and our export of the import gives the same tensors back
  sd = hf_export.mae_state_dict(params, saved["model"], (4, 4))
  back, _ = torch_import.read(sd, hf_export.mae_config(saved["model"], (4, 4)))
  assert_bitwise(back["params"], params)


# ---------------------------------------------------------------------------------------- DeiT

def test_deit_release_distilled_gives_torch_logits(tmp_path):
  torch.manual_seed(4)
  theirs = ref.perturb_(ref.ViT(grid=(4, 4), patch=8, dim=48, depth=2, heads=4, hidden=192, num_classes=6,
                                distilled=True))
  for name, how in (("deit_distilled.pth", "wrapped"), ("deit_distilled.safetensors", "safetensors")):
    variables, saved = load_variables(save_release(tmp_path / name, state_dict(theirs), how), hints={"num_heads": 4})
    assert saved["model"]["distilled"] and saved["image_size"] == [32, 32]
    with torch.no_grad():
      assert_close(VisionTransformer(**saved["model"]).apply(variables, IMAGES)[0], theirs(NCHW), f"DeiT ({name})")
  # The same file as a distillation teacher.
  from vit_jax.train import tasks
  model, teacher = tasks.load_teacher(str(tmp_path / "deit_distilled.pth"), 6, {"num_heads": 4})
  with torch.no_grad():
    assert_close(model.apply(teacher, IMAGES)[0], theirs(NCHW), "DeiT teacher logits")


# -------------------------------------------------------------------------------------- LV-ViT

LV_SIZE = dict(grid=(2, 2), patch=16, dim=48, depth=2, heads=4, num_classes=5, skip_lam=2.0, stem_width=16)
LV_HINTS = dict(num_heads=4, residual_scale=2.0)


@pytest.mark.parametrize("how", ["bare", "state_dict", "safetensors"])
def test_lvvit_release_gives_torch_logits_and_token_logits(tmp_path, how):
  torch.manual_seed(5)
  theirs = ref.perturb_(ref.LVViT(**LV_SIZE))
  sd = state_dict(theirs)
  if how == "state_dict":  # the reference trainer's wrapper
    path = tmp_path / "lvvit.pth.tar"
    torch.save({"state_dict": sd, "epoch": 3, "arch": "lvvit_s"}, path)
  else:
    path = save_release(tmp_path / ("lvvit.pth.tar" if how == "bare" else "lvvit.safetensors"), sd,
                        "safetensors" if how == "safetensors" else "bare")
  variables, saved = load_variables(path, hints=LV_HINTS)
  assert sorted(variables) == ["batch_stats", "params"]
  s = saved["model"]
  assert (s["stem"], s["token_head"], s["qkv_bias"], s["layer_norm_eps"], s["residual_scale"]) == \
      ("conv", True, False, 1e-5, 2.0)
  logits, out = VisionTransformer(**s).apply(variables, IMAGES)
  with torch.no_grad():
    t_logits, t_tokens = theirs(NCHW)
  assert_close(out["token_logits"], t_tokens, "LV-ViT token logits")
  assert_close(logits, t_logits, "LV-ViT logits")


def test_lvvit_round_trip_hints_and_fine_tuning_with_its_statistics(tmp_path):
  settings = dict(num_classes=5, patch_size=16, width=48, depth=2, num_heads=4, mlp_dim=144, stem="conv",
                  stem_width=16, qkv_bias=False, layer_norm_eps=1e-5, activation="gelu", token_head=True,
                  residual_scale=2.0)
  variables = perturb(VisionTransformer(**settings).init(jax.random.key(0), IMAGES))
  sd = official.lvvit_state_dict(variables, settings, (2, 2))
  sd.update({f"patch_embed.bn{i}.num_batches_tracked": np.array(9, np.int64) for i in (1, 2, 3)})
  back, _ = torch_import.read(sd, hints=LV_HINTS)
  assert_bitwise(back, variables)
  with pytest.raises(ParamMismatchError, match=r"width 48 and depth 2 is none of the released.*residual_scale"):
    torch_import.read(sd)

  # Fine-tuning takes the stem's running statistics along with the weights.
  path = save_release(tmp_path / "lvvit.pth.tar", {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, "bare")
  init = perturb(VisionTransformer(**dict(settings, num_classes=3)).init(jax.random.key(1), IMAGES), scale=0.5)
  got = load_pretrained_variables(path, init, reinit_head=True, dont_load=["^aux_head/"])
  assert_bitwise(got["batch_stats"], variables["batch_stats"])
  np.testing.assert_array_equal(got["params"]["head"]["kernel"], init["params"]["head"]["kernel"])
  np.testing.assert_array_equal(got["params"]["stem"]["Conv_0"]["kernel"], variables["params"]["stem"]["Conv_0"]["kernel"])


def test_unsupported_timm_options_are_named(tmp_path):
  torch.manual_seed(6)
  sd = state_dict(ref.ViT(grid=(4, 4), patch=8, dim=48, depth=1, heads=4, hidden=96, num_classes=3))
  # QK-norm is read (its width gives the heads), and a half-present one is named.
  qk = dict(sd, **{f"blocks.0.attn.{n}_norm.{w}": torch.full((12,), float(i)) for i, (n, w) in
                   enumerate([("q", "weight"), ("q", "bias"), ("k", "weight"), ("k", "bias")])})
  variables, saved = load_variables(save_release(tmp_path / "qk.pth", qk))
  assert saved["model"]["qk_norm"] == "layernorm" and saved["model"]["num_heads"] == 4
  assert float(variables["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
               ["key_norm"]["bias"][0]) == 3.0
  half = {k: v for k, v in qk.items() if "k_norm" not in k}
  with pytest.raises(ParamMismatchError, match="missing \\['blocks.0.attn.k_norm.bias', 'blocks.0.attn.k_norm.weight'\\]"):
    load_variables(save_release(tmp_path / "half.pth", half))
  deit3 = dict(sd, **{"blocks.0.gamma_1": torch.ones(48), "blocks.0.gamma_2": torch.ones(48)})
  with pytest.raises(ParamMismatchError, match="DeiT-III"):
    load_variables(save_release(tmp_path / "deit3.pth", deit3))


# ------------------------------------------------------------------------------------- convert

def test_convert_releases_keeps_what_each_target_can_hold(tmp_path, capsys):
  from vit_jax import checkpoint
  from vit_jax.interop import convert
  torch.manual_seed(7)
  lv = ref.perturb_(ref.LVViT(**LV_SIZE))
  lv_path = save_release(tmp_path / "lvvit_s.pth.tar", state_dict(lv), "bare")
  assert convert.main(["--input", lv_path, "--to", "orbax", "--output", str(tmp_path / "lv"),
                       "--config", "num_heads=4,residual_scale=2"]) == 0
  variables, saved = checkpoint.load_variables(tmp_path / "lv")
  expected, _ = load_variables(lv_path, hints=LV_HINTS)
  assert_bitwise(variables, expected)  # the BatchNorm statistics travel with the weights
  assert saved["model"]["residual_scale"] == 2.0
  assert convert.main(["--input", lv_path, "--to", "vit_jax_npz", "--output", str(tmp_path / "lv.npz"),
                       "--config", "num_heads=4,residual_scale=2"]) == 2
  assert "BatchNorm statistics" in capsys.readouterr().err and not (tmp_path / "lv.npz").exists()

  mae = ref.perturb_(ref.MAE(**MAE_SIZE, norm_pix_loss=True))
  mae_path = save_release(tmp_path / "mae_pretrain_vit_tiny_full.pth", state_dict(mae))
  spec = "num_heads=4,decoder_heads=4,norm_pix_loss=true"
  assert convert.main(["--input", mae_path, "--to", "hf", "--output", str(tmp_path / "hf"), "--config", spec]) == 0
  assert convert.main(["--input", mae_path, "--to", "orbax", "--output", str(tmp_path / "o"), "--config", spec]) == 0
  from_hf, saved_hf = load_variables(tmp_path / "hf")
  from_orbax, saved_orbax = checkpoint.load_variables(tmp_path / "o")
  direct, _ = load_variables(mae_path, hints=dict(num_heads=4, decoder_heads=4))
  assert_bitwise(from_hf, direct)
  assert_bitwise(from_orbax, direct)
  assert saved_orbax["task"] == "mae" and saved_hf["model"]["norm_pix_loss"] and saved_orbax["model"]["norm_pix_loss"]
  assert convert.main(["--input", mae_path, "--to", "timm", "--output", str(tmp_path / "t"), "--config", spec]) == 2
  assert "converts to orbax or hf" in capsys.readouterr().err


@pytest.mark.slow
def test_trainer_fine_tunes_an_mae_release(tmp_path):
  """`configs/mae.py:mode=finetune,init=mae_visualize_*.pth`: at lr 0 the encoder leaves training as the file has it."""
  from configs.mae import get_config
  from vit_jax import checkpoint
  from vit_jax.train import trainer
  torch.manual_seed(8)
  theirs = ref.perturb_(ref.MAE(grid=(4, 4), patch=2, dim=64, depth=1, heads=4, decoder_dim=32, decoder_depth=2,
                                decoder_heads=4, channels=1, mlp_ratio=2))
  path = save_release(tmp_path / "mae_visualize_vit_digits.pth", state_dict(theirs))
  c = get_config(f"mode=finetune,init={path}")
  c.update(dict(total_steps=2, log_steps=2, eval_steps=2, checkpoint_steps=2, num_devices=1, batch_size=16))
  c.model.depth = 1
  c.optim.lr = 0.0
  c.optim.schedule.warmup_steps, c.optim.schedule.min_lr = 0, 0.0
  c.data.data_dir = str(tmp_path / "tfds")
  trainer.train_and_evaluate(c, str(tmp_path / "ft"))
  tuned = flatten(checkpoint.load(tmp_path / "ft")[0])
  np.testing.assert_array_equal(tuned["cls"], theirs.cls_token.detach().numpy())
  np.testing.assert_array_equal(tuned["embedding/kernel"],
                                theirs.patch_embed.proj.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(tuned["Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias"],
                                theirs.blocks[0].mlp.fc2.bias.detach().numpy())
  assert "fc_norm/scale" in tuned and not any(k.startswith(("Decoder/", "decoder_")) for k in tuned)


@pytest.mark.slow
def test_trainer_fine_tunes_an_lvvit_release_with_its_batchnorm_statistics(tmp_path):
  """`--config.init.path=lvvit.pth.tar` into the conv-stem digits model: weights and running statistics
  both come from the file (at lr 0 the weights stay; the statistics move on from the file's)."""
  from configs.vit import get_config
  from vit_jax import checkpoint
  from vit_jax.train import trainer
  torch.manual_seed(9)
  theirs = ref.perturb_(ref.LVViT(grid=(4, 4), patch=2, dim=16, depth=1, heads=2, num_classes=10, skip_lam=1.0,
                                  stem_width=8, channels=1))
  path = save_release(tmp_path / "lvvit.pth.tar", state_dict(theirs), "bare")
  c = get_config()
  c.update(dict(total_steps=2, log_steps=2, eval_steps=2, checkpoint_steps=2, num_devices=1, batch_size=16))
  c.model.update(dict(width=16, depth=1, mlp_dim=48, num_heads=2, stem_width=8, qkv_bias=False, layer_norm_eps=1e-5,
                      pool_type="token", token_head=True))
  c.init.update(dict(path=path, reinit_head=False))
  c.optim.lr = 0.0
  c.optim.schedule.warmup_steps, c.optim.schedule.min_lr = 0, 0.0
  c.data.data_dir = str(tmp_path / "tfds")
  trainer.train_and_evaluate(c, str(tmp_path / "ft"))
  variables, _ = checkpoint.load_variables(tmp_path / "ft")
  np.testing.assert_array_equal(variables["params"]["aux_head"]["kernel"], theirs.aux_head.weight.detach().numpy().T)
  for i in range(3):
    ours = variables["batch_stats"]["stem"][f"BatchNorm_{i}"]["mean"]
    file = getattr(theirs.patch_embed, f"bn{i + 1}").running_mean.numpy()
    # Two updates at momentum 0.9 keep 0.81 of the file's statistics; started from zeros, none of them.
    assert np.corrcoef(ours, file)[0, 1] > 0.9, i
