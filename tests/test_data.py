"""Input pipeline: bundled digits, TFDS by name (mock data), image folders, sharding, resumable state,
padded evaluation, preprocessing ops and on-device mixing."""

import os

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.data import input_pipeline, mixing, preprocess


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_digits_are_the_real_scikit_learn_digits(data_dir):
  from sklearn.datasets import load_digits
  train = input_pipeline.get_source("digits", "train", data_dir)
  test = input_pipeline.get_source("digits", "test", data_dir)
  assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
  x, y = load_digits(return_X_y=True)
  ex = test.data[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  matches = np.flatnonzero(np.all(np.round(x * 255 / 16) == ex["image"].reshape(-1), axis=1))
  assert len(matches) and y[matches[0]] == ex["label"]


class Indexed:
  """A source whose example i has label i, to track what the pipeline reads."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), i % 256, np.uint8), "label": i}


def labels_of(it, steps):
  return np.concatenate([next(it)["label"] for _ in range(steps)])


def test_training_stream_is_global_reshuffled_and_resumable():
  src = input_pipeline.Source(Indexed(40), 40, "indexed")
  stream = lambda **kw: iter(input_pipeline.train_dataset(src, "flip_lr|value_range(-1, 1)", 10, seed=0, **kw))
  whole = next(stream())
  it = stream()
  first_epoch = labels_of(it, 4)
  assert sorted(first_epoch) == list(range(40))  # one epoch covers everything once
  ahead = labels_of(it, 6)
  assert not np.array_equal(ahead[:40], first_epoch)  # a new order every epoch
  # A process reads only its rows of each global batch: the same examples, the same augmentation draws.
  rows = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9]), np.array([2, 7])]
  for r in rows:
    part = next(stream(rows=r))
    for k in ("image", "label"):
      np.testing.assert_array_equal(part[k], whole[k][r])
  # Resuming at global batch 4 reads what the uninterrupted stream read from there.
  assert np.array_equal(labels_of(stream(start=4), 6), ahead)
  with pytest.raises(ValueError, match="rows must index a batch of 10"):
    stream(rows=np.array([3, 10]))


class WithGeometry:
  """The digits with token labeling's `geometry`, which the spatial ops keep up to date."""

  def __init__(self, data):
    self.data = data

  def __len__(self):
    return len(self.data)

  def __getitem__(self, i):
    return dict(self.data[i], geometry=preprocess.IDENTITY)


class PerExample(grain.RandomMapTransform):
  def __init__(self, spec):
    self.ops = preprocess.parse(spec)

  def random_map(self, example, rng):
    return preprocess.apply(self.ops, example, rng)


@pytest.mark.parametrize("pp,geometry,repeats", [
    ("decode|random_crop_pad(1)|value_range(-1, 1)", False, 1),
    ("decode|random_crop_pad(2)|flip_lr|central_crop(6)|value_range(-1, 1)", True, 1),
    ("decode|resize(12)|inception_crop(8, area_min=30)|flip_lr|value_range(0, 1)", True, 3),
])
def test_batched_preprocessing_equals_grains_per_example_map(data_dir, pp, geometry, repeats):
  """Batch j equals grain's `random_map` applied example by example (each example's own generator),
  bit for bit, from the host (float32) and through the device (uint8, `value_range` in a jitted step)."""
  src = input_pipeline.get_source("digits", "train", data_dir)
  if geometry:
    src = input_pipeline.Source(WithGeometry(src.data), src.num_classes, src.name)
  seed, batch, start = 3, 16, 5
  if repeats > 1:
    stream = grain.MapDataset.source(input_pipeline.RepeatedAugmentation(src.data, repeats, seed))
  else:
    stream = grain.MapDataset.source(src.data).shuffle(seed=seed).repeat(None)
  reference = stream.random_map(PerExample(pp), seed=seed + 1)
  kw = dict(seed=seed, start=start, repeated_augmentation=repeats)
  host = iter(input_pipeline.train_dataset(src, pp, batch, **kw))
  uint8 = iter(input_pipeline.train_dataset(src, pp, batch, on_device=True, **kw))
  to_float = jax.jit(preprocess.split_device(pp)[1])
  for j in range(start, start + 3):
    want = [reference[j * batch + r] for r in range(batch)]
    got, raw = next(host), next(uint8)
    assert raw["image"].dtype == np.uint8 and got["image"].dtype == np.float32
    for k in ["image", "label"] + (["geometry"] if geometry else []):
      np.testing.assert_array_equal(got[k], np.stack([np.asarray(e[k], got[k].dtype) for e in want]), err_msg=k)
    np.testing.assert_array_equal(np.asarray(to_float(raw["image"])), got["image"])


def test_worker_processes_give_the_same_batches(data_dir):
  src = input_pipeline.get_source("digits", "train", data_dir)
  pp = "decode|random_crop_pad(1)|flip_lr|value_range(-1, 1)"
  threads = iter(input_pipeline.train_dataset(src, pp, 32, seed=0, start=2))
  workers = iter(input_pipeline.train_dataset(src, pp, 32, seed=0, start=2, workers=2))
  for _ in range(4):
    a, b = next(threads), next(workers)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("batch", [8, 360, 512])
def test_evaluation_pads_and_masks_instead_of_dropping(data_dir, batch):
  src = input_pipeline.get_source("digits", "test", data_dir)
  batches = list(input_pipeline.eval_batches(src, "value_range(-1, 1)", batch))
  assert all(b["image"].shape == (batch, 8, 8, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and len(batches) == -(-360 // batch)
  labels = np.concatenate([b["label"] for b in batches])[mask > 0]
  assert np.array_equal(labels, [src.data[i]["label"] for i in range(360)])
  # Two processes, each with its rows of every global batch: the same batches, every example exactly once.
  halves = [list(input_pipeline.eval_batches(src, "value_range(-1, 1)", batch, rows=r))
            for r in (np.arange(batch // 2), np.arange(batch // 2, batch))]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  for k in ("image", "label", "mask"):
    glued = np.concatenate([np.concatenate([a[k], b[k]]) for a, b in zip(*halves)])
    np.testing.assert_array_equal(glued, np.concatenate([b[k] for b in batches]))


def test_tfds_dataset_by_name_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24):
    src = input_pipeline.get_source("mnist", "train")
    assert (len(src), src.num_classes) == (24, 10)
    it = iter(input_pipeline.train_dataset(src, "decode|resize(16)|value_range(-1, 1)", 8, seed=0))
    batch = next(it)
    assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_unprepared_tfds_dataset_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="cannot download it.*download_and_prepare"):
    input_pipeline.get_source("cifar10", "train", str(tmp_path))


def write_folder(root, per_class=3):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in ("cat", "dog"):
      os.makedirs(root / split / c)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
  write_folder(tmp_path)
  src = input_pipeline.get_source(f"folder:{tmp_path}", "train")
  assert (len(src), src.num_classes) == (6, 2)
  batches = list(input_pipeline.eval_batches(input_pipeline.get_source(f"folder:{tmp_path}", "test"),
                                             "decode|resize(8)|value_range(-1, 1)", 4))
  assert batches[0]["image"].shape == (4, 8, 8, 3) and sum(b["mask"].sum() for b in batches) == 6
  with pytest.raises(FileNotFoundError, match="No image folder"):
    input_pipeline.get_source(f"folder:{tmp_path / 'nope'}", "train")


def test_preprocessing_ops():
  rng = np.random.default_rng(0)
  image = np.arange(12 * 16 * 3, dtype=np.int64).reshape(12, 16, 3).astype(np.uint8)
  ex = {"image": image, "label": 1}
  run = lambda spec, r=None: preprocess.apply(preprocess.parse(spec), ex, r)["image"]
  assert run("resize(6, 8)").shape == (6, 8, 3)
  assert np.array_equal(run("central_crop(4, 6)"), image[4:8, 5:11])
  padded = run("central_pad(16, 20)")
  assert padded.shape == (16, 20, 3) and np.array_equal(padded[2:14, 2:18], image) and padded.sum() == image.sum()
  # The geometry follows: the padded image's normalised (y, x) maps back to (16y - 2) / 12, (20x - 2) / 16.
  geo = preprocess.apply(preprocess.parse("central_pad(16, 20)"), dict(ex, geometry=preprocess.IDENTITY.copy()),
                         None)["geometry"]
  np.testing.assert_allclose(geo, [-2 / 12, -2 / 16, 16 / 12, 20 / 16], rtol=1e-6)
  with pytest.raises(ValueError, match="it is larger; crop it instead"):
    run("central_pad(8)")
  assert run("inception_crop(10)", rng).shape == (10, 10, 3)
  out = run("value_range(-1, 1)")
  assert out.dtype == np.float32 and np.isclose(out.min(), image.min() / 127.5 - 1)
  flips = {run("flip_lr", np.random.default_rng(s))[0, 0, 0] for s in range(20)}
  assert flips == {image[0, 0, 0], image[0, -1, 0]}
  shifted = run("random_crop_pad(2)", rng)
  assert shifted.shape == image.shape
  with pytest.raises(ValueError, match="Unknown preprocessing op 'rotate"):
    preprocess.parse("decode|rotate(10)")
  assert run("inception_crop(10, area_min=20)", rng).shape == (10, 10, 3)  # keyword arguments
  with pytest.raises(ValueError, match="Bad arguments in preprocessing op 'inception_crop.*area_mn"):
    preprocess.parse("inception_crop(10, area_mn=20)")
  with pytest.raises(ValueError, match="use Python literals"):
    preprocess.parse("resize(6, x)")
  with pytest.raises(ValueError, match="is random"):
    run("flip_lr")


def test_mixup_and_cutmix_conserve_label_mass():
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (6, 8, 8, 3))
  labels = jax.nn.one_hot(jnp.arange(6) % 3, 3)
  for fn in (lambda r: mixing.mixup(r, images, labels, 0.4), lambda r: mixing.cutmix(r, images, labels, 1.0),
             lambda r: mixing.mix(r, images, labels, mixup_alpha=0.2, cutmix_alpha=1.0)):
    x, y = fn(jax.random.key(3))
    assert x.shape == images.shape and np.allclose(y.sum(-1), 1.0)
  # CutMix: the label weight of the pasted image equals the pasted area.
  x, y = mixing.cutmix(jax.random.key(5), images, labels, 1.0)
  pasted = np.mean(np.any(np.asarray(x) != np.asarray(images), axis=-1)[0])
  assert np.isclose(float(y[0, int(jnp.argmax(labels[1]))]), pasted, atol=1e-6)  # row 0's partner is row 1


@pytest.mark.parametrize("n", [6, 7])
def test_mixing_pairs_neighbouring_rows(n):
  """Rows 2k and 2k + 1 mix with each other (an odd last row with itself): lam from the same key."""
  r = np.random.default_rng(0)
  images, labels = r.standard_normal((n, 4, 4, 1)).astype(np.float32), np.eye(n, dtype=np.float32)
  partners = np.arange(n) ^ 1
  partners[partners == n] = n - 1
  np.testing.assert_array_equal(mixing.partner(images), images[partners])
  key = jax.random.key(7)
  lam = float(jax.random.beta(key, 0.4, 0.4))
  x, y = mixing.mixup(key, images, labels, 0.4)
  np.testing.assert_allclose(x, lam * images + (1 - lam) * images[partners], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y, lam * labels + (1 - lam) * labels[partners], rtol=1e-6, atol=1e-6)
