"""Image GPT: logits, hidden states and probe features against Hugging Face's
`ImageGPTForCausalImageModeling` with every parameter perturbed; the export and the import both ways;
the palette against its definitions."""

import jax
import numpy as np
import pytest

from vit_jax.data import palette
from vit_jax.interop import igpt as igpt_interop
from vit_jax.interop.tree import flatten
from vit_jax.models.igpt import ImageGPT, ImageGPTClassifier, probe_features, sos_shift

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

  # The completion grid: original | given | samples, from the command line.
  from PIL import Image

  from vit_jax.evaluate import complete
  assert complete.main(["--workdir", str(tmp_path / "run"), "--num", "3", "--samples", "2", "--top_k", "5"]) == 0
  with Image.open(tmp_path / "run" / "completions.png") as img:
    grid = np.asarray(img.convert("L"))
  assert grid.shape == (3 * 98 + 2, 4 * 98 + 2) and grid.std() > 10  # 3 rows x 4 columns of 96 px cells
  cell = lambda r, c: grid[2 + 98 * r:2 + 98 * r + 96, 2 + 98 * c:2 + 98 * c + 96]
  for r in range(3):  # the top half given and kept by every sample; the given column's bottom half is grey
    top = cell(r, 0)[:48]
    assert all(np.array_equal(cell(r, c)[:48], top) for c in (1, 2, 3))
    assert np.ptp(cell(r, 1)[48:]) == 0

  # Fine-tuning as a classifier from that checkpoint: every pre-trained weight loads by name (step 0
  # reproduces the pre-trained next-pixel logits), the new head starts at zero, and it learns.
  from vit_jax import checkpoint
  from vit_jax.interop.tree import flatten
  from vit_jax.models.igpt import sos_shift
  f = get_config(f"mode=finetune,runlocal,init={tmp_path / 'run'},split=train[:50%]")
  f.update(dict(total_steps=30, log_steps=10, eval_steps=30, checkpoint_steps=30, num_devices=2, batch_size=32))
  f.model.update(width=32, depth=2, num_heads=2)
  f.data.data_dir = str(tmp_path / "tfds")
  f.optim.lr = 0.0  # step 0's parameters stay: compare them with the pre-trained ones
  f.optim.schedule.warmup_steps = 0
  trainer.train_and_evaluate(f, str(tmp_path / "ft0"))
  pre, tuned = flatten(checkpoint.load(str(tmp_path / "run"))[0]), flatten(checkpoint.load(str(tmp_path / "ft0"))[0])
  assert sorted(tuned) == sorted([*pre, "head/bias", "head/kernel"])
  assert all(np.array_equal(pre[k], tuned[k]) for k in pre) and not np.any(tuned["head/kernel"])
  classifier = tasks.get_task(f, 10).model
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  params = checkpoint.load(str(tmp_path / "ft0"))[0]
  logits, out = classifier.apply({"params": params}, x)
  want, _ = task.model.apply({"params": checkpoint.load(str(tmp_path / "run"))[0]},
                             sos_shift(task.tokens(x), 17))
  np.testing.assert_allclose(np.asarray(out["lm_logits"]), np.asarray(want), atol=1e-6)
  # With a learning rate every weight moves, the body's too (that the classifier learns is
  # test_classifier_fits_a_batch_of_digits: a 40-step model is too weak to show it in a few steps here).
  f.optim.lr, f.total_steps, f.eval_steps, f.checkpoint_steps = 3e-3, 20, 20, 20
  f.optim.schedule.warmup_steps = 2
  trainer.train_and_evaluate(f, str(tmp_path / "ft"))
  moved = flatten(checkpoint.load(str(tmp_path / "ft"))[0])
  assert [k for k in pre if np.array_equal(pre[k], moved[k])] == [] and np.all(moved["head/kernel"] != 0)
  losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "ft" / "metrics.jsonl") if "train/loss" in line]
  assert abs(losses[0] - np.log(10)) < 0.1, losses  # label smoothing keeps log(10) at a zero head
  f.model.channels = 3
  with pytest.raises(ValueError, match="model.channels=3 but the palette's colours have 1 channels"):
    trainer.train_and_evaluate(f, str(tmp_path / "ft_bad"))


def test_classifier_fits_a_batch_of_digits():
  """Image GPT as a classifier (mean of the final norm's output, a zero-initialised head) learns: Adam
  fits 32 digits from log(10) to below 0.5 nats in 40 steps; frozen at zero the head would stay at log(10)."""
  import optax
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = (digits.images[:32, :, :, None] / 8.0 - 1.0).astype(np.float32)
  y = digits.target[:32]
  colours = tuple((float(v),) for v in np.linspace(-1, 1, 17))
  model = ImageGPTClassifier(vocab_size=17, num_positions=64, width=32, depth=2, num_heads=2, num_classes=10,
                             palette=colours, channels=1)
  params = model.init(jax.random.key(0), x)["params"]
  assert not np.any(params["head"]["kernel"])
  opt = optax.adam(3e-3)
  state = opt.init(params)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(40):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(10), abs=1e-5) and losses[-1] < 0.5, losses


# ------------------------------------------------------------------------------------------ decoding

def hf_params():
  model, config = hf_model()
  return igpt_interop.from_hf({k: v.numpy() for k, v in model.state_dict().items()}, config.to_dict())[0]


@pytest.mark.parametrize("scan", [False, True])
def test_key_value_cache_gives_the_full_forward_logits(scan):
  """A prompt of 10 tokens at once, then one token at a time through the cache: every position's
  logits equal the full causal forward's (1e-5), unrolled and scanned."""
  from vit_jax.models.encoder import unrolled_to_scan
  from vit_jax.models.igpt import init_cache

  params = hf_params()
  if scan:
    params = dict(params, Transformer=unrolled_to_scan(params["Transformer"]))
  model = ImageGPT(**SETTINGS, scan=scan)
  _, x = ids(seed=3)
  full, _ = model.apply({"params": params}, x)
  cache = init_cache(model, 2)
  assert cache["key"].shape == (3, 2, 64, 4, 8)
  logits, out = model.apply({"params": params}, x[:, :10], cache=cache, cache_index=0)
  steps = [logits]
  step = jax.jit(lambda c, t, i: model.apply({"params": params}, t, cache=c, cache_index=i))
  cache = out["cache"]
  for i in range(10, 64):
    logits, out = step(cache, x[:, i:i + 1], i)
    steps.append(logits)
    cache = out["cache"]
  np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-5)
  assert np.std(np.asarray(full)) > 0.1


def test_completion_keeps_the_prompt_and_greedy_follows_the_full_model():
  """Greedy completion (temperature 0) against a loop that reruns the whole model for every pixel;
  top-k 1 sampling is greedy; samples depend on the key and only on it."""
  from vit_jax import decode

  params = hf_params()
  model = ImageGPT(**SETTINGS)
  pixels, _ = ids(seed=4)
  prompt = pixels[:, :24]
  complete = jax.jit(lambda p, prompt, rng, t, k: decode.complete_images(
      model, {"params": p}, prompt, rng, length=40, temperature=t, top_k=k), static_argnums=(3, 4))
  greedy = np.asarray(complete(params, prompt, None, 0.0, None))
  want = prompt.copy()
  for _ in range(24, 40):
    logits, _ = model.apply({"params": params}, np.asarray(sos_shift(np.pad(want, ((0, 0), (0, 1))), 17)))
    want = np.concatenate([want, np.argmax(np.asarray(logits[:, -1]), -1)[:, None]], 1)
  assert greedy.shape == (2, 40) and np.array_equal(greedy[:, :24], prompt)
  assert np.array_equal(greedy, want)
  rng = jax.random.PRNGKey(0)
  assert np.array_equal(np.asarray(complete(params, prompt, rng, 1.0, 1)), greedy)
  a, b = (np.asarray(complete(params, prompt, rng, 1.0, None)) for _ in range(2))
  c = np.asarray(complete(params, prompt, jax.random.PRNGKey(1), 1.0, None))
  assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, greedy)
  assert a.min() >= 0 and a.max() < 17
  # from nothing: the SOS alone starts the image
  assert np.asarray(complete(params, prompt[:, :0], rng, 1.0, None)).shape == (2, 40)
  with pytest.raises(ValueError, match="prompt must be shorter than length"):
    decode.complete_images(model, {"params": params}, pixels[:, :40], rng, length=40)
