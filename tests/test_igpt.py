"""Image GPT: logits, hidden states and probe features against Hugging Face's
`ImageGPTForCausalImageModeling` with every parameter perturbed; the export and the import both ways;
the palette against its definitions."""

import jax
import numpy as np
import pytest

from vit_jax.data import palette
from vit_jax.interop import igpt as igpt_interop
from vit_jax.interop.tree import flatten
from vit_jax.models.igpt import ImageGPT, probe_features, sos_shift

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SETTINGS = dict(vocab_size=17, num_positions=64, width=32, depth=3, num_heads=4)


def hf_model(seed=0):
  config = transformers.ImageGPTConfig(vocab_size=18, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  torch.manual_seed(seed)
  model = transformers.ImageGPTForCausalImageModeling(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # every weight, norm scale and bias away from its initial value
      p.add_(0.2 * torch.randn_like(p))
  return model, config


def ids(seed=1, n=64):
  pixels = np.random.default_rng(seed).integers(0, 17, (2, n)).astype(np.int32)
  return pixels, np.array(sos_shift(pixels, 17))


def test_logits_hidden_states_and_probe_features_match_hugging_face():
  model, config = hf_model()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params, settings = igpt_interop.from_hf(sd, config.to_dict())
  assert settings == dict(SETTINGS, mlp_dim=128, activation="quick_gelu", layer_norm_eps=1e-5, family="igpt")
  pixels, x = ids()
  assert x[0, 0] == 17 and np.array_equal(x[:, 1:], pixels[:, :-1])  # the SOS, then the pixels shifted right
  with torch.no_grad():
    theirs = model(torch.from_numpy(x), output_hidden_states=True)
  ours = ImageGPT(**{k: v for k, v in settings.items() if k != "family"})
  logits, out = jax.jit(lambda p, x: ours.apply({"params": p}, x, features=True))(params, x)
  want = theirs.logits.numpy()
  assert logits.shape == (2, 64, 17) and np.max(np.abs(np.asarray(logits) - want)) <= 2e-5 and np.std(want) > 0.1
  hidden = [h.numpy() for h in theirs.hidden_states]  # [0..L-1]: block inputs; [L]: after ln_f
  np.testing.assert_allclose(np.asarray(out["hidden"]), np.stack(hidden[:-1]), atol=2e-5)
  # The paper's probe features: block l's input through its ln_1, mean over the sequence; ln_f's output.
  def ln(h, w):
    return h / np.sqrt(np.mean(h ** 2, -1, keepdims=True) + 1e-5) * w
  f = [ln(hidden[i], model.transformer.h[i].ln_1.weight.detach().numpy()).mean(1) for i in range(3)]
  f.append(hidden[3].mean(1))
  np.testing.assert_allclose(np.asarray(probe_features(params, out)), np.stack(f), atol=2e-5)

  # Export: the same tensors by name, and a folder transformers loads itself.
  mine = igpt_interop.hf_state_dict(params, settings)
  assert sorted(mine) == sorted(k for k in sd if not k.endswith((".attn.bias", ".attn.masked_bias")))
  assert all(np.array_equal(mine[k], sd[k]) for k in mine)


def test_save_hf_folder_loads_in_transformers(tmp_path):
  x = ids(2, 40)[1]  # shorter than the positions
  model = ImageGPT(**SETTINGS)
  from tests.helpers import random_params
  params = random_params(model, x)
  want = np.asarray(model.apply({"params": params}, x)[0])
  igpt_interop.save_hf(params, SETTINGS, tmp_path / "hf")
  theirs = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    got = theirs(torch.from_numpy(x)).logits.numpy()
  assert np.max(np.abs(got - want)) <= 2e-5
  back, _ = igpt_interop.from_hf({k: v.numpy() for k, v in theirs.state_dict().items()},
                                 theirs.config.to_dict())
  a, b = flatten(params), flatten(back)
  assert sorted(a) == sorted(b) and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)


def test_model_refuses_too_long_sequences_and_sees_only_the_past():
  model = ImageGPT(**SETTINGS)
  pixels, x = ids(3)
  from tests.helpers import random_params
  params = random_params(model, x)
  with pytest.raises(ValueError, match="65 tokens are more than the model's 64 positions"):
    model.apply({"params": params}, np.zeros((1, 65), np.int32))
  changed = x.copy()
  changed[:, 40:] = (changed[:, 40:] + 1) % 17
  a, b = (np.asarray(model.apply({"params": params}, v)[0]) for v in (x, changed))
  np.testing.assert_array_equal(a[:, :40], b[:, :40])  # causal: earlier positions never see later ones
  assert np.abs(a[:, 40:] - b[:, 40:]).max() > 1e-3


def test_palette_quantize_dequantize_and_the_digits_levels():
  rng = np.random.default_rng(0)
  pal = rng.uniform(-1, 1, (9, 3)).astype(np.float32)
  pixels = rng.uniform(-1, 1, (4, 5, 6, 3)).astype(np.float32)
  got = palette.quantize(pixels, pal)
  brute = np.argmin(((pixels[..., None, :] - pal) ** 2).sum(-1), axis=-1)
  assert got.shape == (4, 5, 6) and np.array_equal(got, brute)
  assert np.array_equal(palette.quantize(palette.dequantize(got, pal), pal), got)
  assert palette.to_uint8(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
  # The digits: uint8 round(v * 255 / 16) through value_range(-1, 1) come back as their levels v.
  levels = np.arange(17)
  stored = np.round(levels * 255.0 / 16).astype(np.uint8)
  assert np.array_equal(palette.quantize((stored / 127.5 - 1.0)[:, None], palette.grey_palette(17)), levels)
  assert np.array_equal(palette.to_uint8(palette.dequantize(levels, palette.grey_palette(17)))[:, 0], stored)
  with pytest.raises(ValueError, match="3 channels cannot be matched to a palette of shape"):
    palette.quantize(pixels, palette.grey_palette(17))


def test_kmeans_finds_separated_colours_and_is_deterministic():
  rng = np.random.default_rng(1)
  true = np.array([[-0.8, -0.8, -0.8], [0.0, 0.5, -0.5], [0.7, 0.7, 0.9]], np.float32)
  pixels = (true[rng.integers(0, 3, 3000)] + 0.03 * rng.standard_normal((3000, 3))).astype(np.float32)
  found = palette.kmeans(pixels, 3, seed=0)
  np.testing.assert_allclose(found, true[np.argsort(true.mean(1))], atol=0.01)
  assert np.array_equal(found, palette.kmeans(pixels, 3, seed=0))
  with pytest.raises(ValueError, match="distinct colours cannot make a palette of 5"):
    palette.kmeans(np.zeros((10, 3)), 5)


@pytest.mark.slow
def test_igpt_pretrains_on_the_digits_through_the_trainer(tmp_path):
  import json

  from configs.igpt import get_config
  from vit_jax.train import tasks, trainer
  c = get_config("runlocal")
  c.update(dict(total_steps=40, log_steps=10, eval_steps=40, checkpoint_steps=40, num_devices=2, batch_size=32))
  c.model.update(width=32, depth=2, num_heads=2)
  c.data.data_dir = str(tmp_path / "tfds")
  final = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  bits = [r["train/bits_per_dim"] for r in rows if "train/bits_per_dim" in r]
  assert len(bits) == 4 and bits[-1] < bits[0]
  assert final["eval/bits_per_dim"] == pytest.approx(final["eval/loss"] / np.log(2), rel=1e-5)
  assert final["eval/bits_per_dim"] < np.log2(17)  # better than uniform over the 17 grey levels
  # The task's tokens are the digits' grey levels themselves.
  task = tasks.get_task(c, 10)
  stored = np.round(np.arange(17) * 255.0 / 16)
  images = np.broadcast_to((stored / 127.5 - 1.0)[None, :, None, None], (1, 17, 1, 1)).astype(np.float32)
  assert np.array_equal(np.asarray(task.tokens(images))[0], np.arange(17))
  c.palette = "grey:5"
  with pytest.raises(ValueError, match="model.vocab_size=17 but the palette has 5 colours"):
    c.model.vocab_size = 17
    tasks.get_task(c, 10)
