"""Datasets -> deterministic, per-process sharded, resumable batches (grain).

Sources (all random access, so any example can be read by index):
  * "digits": scikit-learn's bundled digits, prepared offline on first use (`digits.py`);
  * "folder:/path": image folders `/path/{train,test}/<class>/*.{jpg,jpeg,png}`;
  * any other name: a TFDS dataset already prepared in `data_dir` (array_record),
    read with `tfds.data_source`, e.g. "cifar10", "imagenet2012", "oxford_iiit_pet";
  * text pairs (`text.py`): "en_fr_generated" (the offline corpus) or "pairs:/path/fra.txt", whose
    examples are `{"source", "target"}` id arrays (no preprocessing ops).

Training: one global stream of batches, shuffled with a new order every epoch
and preprocessed with a random stream per stream position, whatever the number of
processes and devices; each process reads only the rows of each batch that its
devices hold.  Batch j is a pure function of (seed, batch size, j), so a resumed
run (on any topology) starts at the batch after its step and sees exactly the
batches it would have.

Evaluation never drops an example: the last batch is padded and carries a
`mask` (1 = real example).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Iterator

import grain.python as grain
import numpy as np

from vit_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class Source:
  data: Any                      # random access: len(data), data[i] -> {"image", "label"} (or text ids)
  num_classes: int               # classes, or the target vocabulary size of text pairs
  name: str
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # text: vocabularies and lengths

  def __len__(self) -> int:
    return len(self.data)


class ImageFolder:
  """`root/<class>/*.jpg` as a random-access source of decoded HWC uint8 images.

  `classes` (default: the sorted sub-directory names) give the labels.  Every image is decoded
  to `channels` (1 or 3; default: 1 for grey files, 3 for the rest), so grey, RGB, RGBA, palette
  and 16-bit files can share a folder.  A file that cannot be decoded is an error naming it, or,
  with `skip_unreadable`, is replaced by the next readable file with a warning.
  """

  def __init__(self, root: str, classes: list[str] | None = None, *, channels: int | None = None,
               skip_unreadable: bool = False):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"No image folder at {root!r}: expected {root}/<class>/*.jpg.")
    self.classes = classes or _class_folders(root)
    self.channels, self.skip_unreadable = channels, skip_unreadable
    self.files = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                  if os.path.isdir(os.path.join(root, c))
                  for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images under {root!r}/<class>/.")
    self._warned: set[str] = set()

  def __len__(self) -> int:
    return len(self.files)

  def _read(self, i: int) -> dict[str, Any]:
    path, label = self.files[i]
    try:
      with open(path, "rb") as f:
        return {"image": preprocess.decode_image(f.read(), self.channels), "label": label}
    except Exception as e:  # PIL raises many types for bad files
      raise UnreadableImageError(f"Cannot read image {path} ({type(e).__name__}: {e}): remove or replace it, or "
                                 "set config.data.skip_unreadable=True to skip unreadable files with a "
                                 "warning.") from None

  def __getitem__(self, i: int) -> dict[str, Any]:
    for k in range(len(self.files)):
      try:
        return self._read((int(i) + k) % len(self.files))
      except UnreadableImageError as e:
        if not self.skip_unreadable:
          raise
        path = self.files[(int(i) + k) % len(self.files)][0]
        if path not in self._warned:
          self._warned.add(path)
          logging.warning("Skipping unreadable image %s (%s); using the next file instead.", path, e)
    raise UnreadableImageError(f"No image in the folder of {self.files[0][0]!r} can be read.")


class UnreadableImageError(ValueError):
  """An image file that cannot be decoded."""


def _class_folders(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _folder_classes(root: str, split: str) -> list[str]:
  """The classes of `root/train` and `root/split`, which must be the same folders."""
  splits = [s for s in dict.fromkeys(("train", split)) if os.path.isdir(os.path.join(root, s))]
  found = {s: set(_class_folders(os.path.join(root, s))) for s in splits}
  union = sorted(set().union(*found.values())) if found else []
  for s, classes in found.items():
    missing = [c for c in union if c not in classes]
    if missing:
      other = next(o for o in found if o != s)
      raise ValueError(f"Class folder(s) {missing[:5]} of {os.path.join(root, other)} are missing from "
                       f"{os.path.join(root, s)}: every split needs the same class folders (an empty folder "
                       "is fine), or the labels would not match.")
  return union


def get_source(name: str, split: str, data_dir: str | None = None,
               text_options: dict[str, Any] | None = None, *, channels: int | None = None,
               skip_unreadable: bool = False) -> Source:
  """The named dataset's split as a random-access `Source` (see the module docstring).

  `text_options` go to `text.load_text_data` (level, test_fraction, corpus sizes, ...).
  Image folders: `channels` (the model's) and `skip_unreadable` go to `ImageFolder`.
  """
  from vit_jax.data import text

  if name == text.GENERATED or name.startswith("pairs:"):
    if split not in ("train", "test"):
      raise ValueError(f"Text pairs have the splits 'train' and 'test', not {split!r}.")
    data = text.load_text_data(name, **dict(text_options or {}))
    return Source(text.EncodedPairs(getattr(data, split), data), len(data.target_vocab), name,
                  info={"text": data})
  if name.startswith("folder:"):
    root = name[len("folder:"):]
    if not os.path.isdir(os.path.join(root, split)):
      raise FileNotFoundError(f"No image folder at {os.path.join(root, split)!r}: expected "
                              f"{root}/{{train,test}}/<class>/*.jpg.")
    classes = _folder_classes(root, split)
    data = ImageFolder(os.path.join(root, split), classes, channels=channels, skip_unreadable=skip_unreadable)
    return Source(data, len(classes), name)
  import tensorflow_datasets as tfds

  if name == "digits":
    from vit_jax.data import digits
    digits.prepare(data_dir)
    name = digits.NAME
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"Unknown dataset {name!r}: {_close_names(name)}") from None
  try:
    data = builder.as_data_source(split=split)  # never downloads (tfds.data_source would try)
  except Exception as e:  # not prepared, unknown split, unreadable files: say which and how to fix
    splits = sorted(builder.info.splits) if builder.is_prepared() else []
    if splits and split not in splits:
      raise ValueError(f"{name!r} has no split {split!r}: choose one of {splits}.") from None
    raise FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) cannot be read from {builder.data_dir!r} ({type(e).__name__}), "
        "and this machine cannot download it. Prepare it where there is network access with "
        f"tfds.builder({name!r}).download_and_prepare(file_format='array_record') and copy the directory, or "
        "set config.data.data_dir.") from None
  data = in_memory(data)
  return Source(data, builder.info.features["label"].num_classes, name)


def _close_names(name: str) -> str:
  import difflib

  import tensorflow_datasets as tfds

  known = ["digits", *tfds.core.registered.list_imported_builders()]
  close = difflib.get_close_matches(name.split(":")[0].lower(), known, n=5, cutoff=0.6)
  hint = f"did you mean {', '.join(close)}? " if close else ""
  return (f"{hint}Give a TFDS name prepared in config.data.data_dir, digits, folder:/path/to/images, "
          "en_fr_generated or pairs:/path/to/pairs.txt.")


EXTRA_KEYS = ("score_values", "score_indices", "geometry")  # token labeling (score_maps.py)


def _keys(example: dict[str, Any]) -> dict[str, Any]:
  """What a batch carries of an image example: the image, the label and token labeling's arrays."""
  if "image" not in example:  # text ids
    return {k: np.asarray(v) for k, v in example.items()}
  out = {"image": example["image"], "label": np.int32(example["label"])}
  out.update({k: np.asarray(example[k]) for k in EXTRA_KEYS if k in example})
  return out


def _finish(batch: dict[str, np.ndarray], on_device: bool) -> dict[str, np.ndarray]:
  """Images as float32, or as they are (uint8) when their final op runs on the device."""
  if "image" in batch and not on_device:
    batch["image"] = np.asarray(batch["image"], np.float32)
  return batch


class _Rngs:
  """The generator of each stream position, as grain's `random_map` derives it (Philox keyed by the
  seed, the position in the counter), so that batched preprocessing draws exactly the numbers the
  per-example map would.  One pool of generators per thread, reset for each position."""

  def __init__(self, seed: int):
    self.seed = seed
    self._local = threading.local()

  def __reduce__(self):  # worker processes build their own pools
    return (_Rngs, (self.seed,))

  def __call__(self, positions: np.ndarray) -> list[np.random.Generator]:
    pool = getattr(self._local, "pool", None)
    if pool is None or len(pool) < len(positions):
      pool = self._local.pool = [np.random.Generator(np.random.Philox(self.seed)) for _ in positions]
    for rng, p in zip(pool, positions):
      state = rng.bit_generator.state
      state["state"]["counter"] = np.array([0, 0, 0, int(p)], np.uint64)
      state.update(buffer=np.zeros(4, np.uint64), buffer_pos=4, has_uint32=0, uinteger=0)
      rng.bit_generator.state = state
    return pool[:len(positions)]


class RepeatedAugmentation:
  """DeiT's repeated augmentation: each epoch, a shuffled order with every index `repeats` times in a row,
  cut to the epoch length, so an epoch sees about 1/repeats of the images, each in `repeats` augmentations.

  Random access over an endless stream (index = epoch * n + position), deterministic in `seed`.
  """

  def __init__(self, data, repeats: int, seed: int):
    self.data, self.repeats, self.seed = data, int(repeats), seed
    self._order: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.data) * 10 ** 9  # endless for practical purposes

  def order(self, epoch: int) -> np.ndarray:
    cached = self._order  # one read: another thread may replace it meanwhile
    if cached is None or cached[0] != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
      cached = self._order = (epoch, np.repeat(perm, self.repeats)[:len(self.data)])
    return cached[1]

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """The example index at each stream position."""
    return _by_epoch(positions, len(self.data), self.order)

  def __getitem__(self, i: int):
    return self.data[int(self.indices([i])[0])]


class Shuffled:
  """Stream position -> example index, a new order every epoch: exactly grain's
  `MapDataset.source(data).shuffle(seed).repeat(None)` (which depends only on the length and the seed).
  With `whole_epochs`, an epoch's order is computed once (for datasets held in memory, where the
  per-position lookups would dominate)."""

  def __init__(self, n: int, seed: int, whole_epochs: bool = False):
    self.n, self.whole_epochs = n, whole_epochs
    self.stream = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)
    self._epoch: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    cached = self._epoch
    if cached is None or cached[0] != epoch:
      start = epoch * self.n
      cached = self._epoch = (epoch, np.fromiter((self.stream[start + i] for i in range(self.n)), np.int64, self.n))
    return cached[1]

  def indices(self, positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, np.int64)
    if not self.whole_epochs:
      return np.fromiter((self.stream[int(p)] for p in positions), np.int64, len(positions))
    return _by_epoch(positions, self.n, self._order)


def _by_epoch(positions, n: int, order) -> np.ndarray:
  """`order(epoch)[position within it]` for stream positions over epochs of `n` examples."""
  epoch, pos = np.divmod(np.asarray(positions, np.int64), n)
  out = np.empty(len(pos), np.int64)
  for e in np.unique(epoch):
    out[epoch == e] = order(int(e))[pos[epoch == e]]
  return out


class Columns:
  """A small dataset held in memory, one array per feature: random access, and `take` of whole batches."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self._n = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {k: v[int(i)] for k, v in self.arrays.items()}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self.arrays.items()}


IN_MEMORY_BYTES = 64 * 2 ** 20


def in_memory(data):
  """`data` as `Columns` when its examples are arrays (decoded pixels, not encoded files) of one shape
  and all of them take less than IN_MEMORY_BYTES; otherwise `data` itself."""
  if not len(data):
    return data
  first = data[0]
  if not all(isinstance(v, (np.ndarray, np.generic, int, float)) for v in first.values()):
    return data
  if len(data) * sum(np.asarray(v).nbytes for v in first.values()) > IN_MEMORY_BYTES:
    return data
  rows = [data[i] for i in range(len(data))]
  arrays = {}
  for k in first:
    values = [np.asarray(r[k]) for r in rows]
    if len({v.shape for v in values}) > 1:
      return data
    arrays[k] = np.stack(values)
  return Columns(arrays)


class LengthBucketedBatches:
  """Whole batches of text pairs of similar length, trimmed to that length: far less padding.

  Each epoch: shuffle (seeded by epoch), cut into chunks of `pool` batches, sort each chunk by length
  (the longer of source and target), cut into batches, shuffle the batches.  A batch's arrays are cut
  to the batch's longest pair rounded up to `multiple`, so only a handful of shapes (compilations)
  occur.  Random access over an endless stream: batch i is a pure function of (seed, i).
  """

  def __init__(self, data, batch_size: int, seed: int, multiple: int = 16, pool: int = 32):
    self.data, self.batch_size, self.seed, self.multiple, self.pool = data, batch_size, seed, multiple, pool
    self.lengths = np.maximum((data.source != 0).sum(1), (data.target != 0).sum(1) - 1)
    self.per_epoch = len(data) // batch_size
    if not self.per_epoch:
      raise ValueError(f"{len(data)} pairs cannot fill one batch of {batch_size}.")
    self._epoch: tuple[int, list[np.ndarray]] | None = None

  def __len__(self) -> int:
    return self.per_epoch * 10 ** 9

  def batches(self, epoch: int) -> list[np.ndarray]:
    if self._epoch is None or self._epoch[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(len(self.data))
      chunk = self.batch_size * self.pool
      out = []
      for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(self.lengths[part], kind="stable")]
        out += [part[i:i + self.batch_size] for i in range(0, len(part) - self.batch_size + 1, self.batch_size)]
      self._epoch = (epoch, [out[i] for i in rng.permutation(len(out))])
    return self._epoch[1]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    epoch, pos = divmod(int(i), self.per_epoch)
    rows = self.batches(epoch)[pos]
    n = -(-int(self.lengths[rows].max()) // self.multiple) * self.multiple
    s, t = min(n, self.data.source.shape[1]), min(n, self.data.target.shape[1] - 1)
    return {"source": self.data.source[rows, :s], "target": self.data.target[rows, :t + 1]}


class _TextBatches:
  """Random access over the whole batches of a text stream (`LengthBucketedBatches`), this process's rows."""

  def __init__(self, stream, rows: np.ndarray, start: int):
    self.stream, self.rows, self.start = stream, rows, start

  def __len__(self) -> int:
    return 10 ** 12  # endless for practical purposes

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    return {k: v[self.rows] for k, v in self.stream[self.start + int(j)].items()}


class _ImageBatches:
  """Random access over the preprocessed global batches of an endless example stream, cut to this
  process's rows: batch j holds stream positions `(start + j) * batch_size + rows`, each preprocessed
  with its position's generator, the batch at once (`preprocess.apply_batch`).  A dataset held in
  memory (`Columns`) gives the batch's examples in one read."""

  def __init__(self, data, order, ops, seed: int, batch_size: int, rows: np.ndarray, start: int, on_device: bool):
    self.data, self.order, self.ops, self.rngs = data, order, ops, _Rngs(seed)
    self.batch_size, self.rows, self.start, self.on_device = batch_size, rows, start, on_device

  def __len__(self) -> int:
    return 10 ** 12  # endless for practical purposes

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    positions = (self.start + int(j)) * self.batch_size + self.rows
    index = self.order.indices(positions)
    if isinstance(self.data, Columns):
      examples = _keys(self.data.take(index))
    else:
      examples = [_keys(self.data[int(i)]) for i in index]
    return _finish(preprocess.apply_batch(self.ops, examples, self.rngs(positions)), self.on_device)


def _iterate(batches, workers: int, threads: int) -> grain.IterDataset:
  ds = grain.MapDataset.source(batches).to_iter_dataset(
      grain.ReadOptions(num_threads=threads if not workers else 1, prefetch_buffer_size=4))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, the defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return ds


def train_dataset(source: Source, pp: str, batch_size: int, *, seed: int, rows=None, start: int = 0,
                  repeated_augmentation: int = 1, workers: int = 0, on_device: bool = False) -> grain.IterDataset:
  """An endless, shuffled, augmented stream of global batches of `batch_size`, from batch `start` on.

  The global batches (which examples, in which order, with which augmentation
  draws) depend only on the source, `seed` and `batch_size`: example k of the
  stream is drawn from the shuffle of its epoch and augmented with a random
  stream keyed by (seed, k).  A process reads only the `rows` of each batch that
  its devices hold (all rows by default), so any number of processes and
  devices trains on the same batches, and a run can resume on another topology.

  repeated_augmentation > 1: DeiT's sampling (`RepeatedAugmentation`).
  Text pairs come in length buckets (`LengthBucketedBatches`), each batch padded to
  its own longest pair, which is then the same on every process.
  workers > 0: preprocessing in that many worker processes (grain's `mp_prefetch`), else two threads.
  on_device: a final `value_range` is left out, the images stay uint8, and the caller applies
    `preprocess.split_device(pp)[1]` on the device.
  """
  rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
  if len(rows) and (rows.min() < 0 or rows.max() >= batch_size):
    raise ValueError(f"rows must index a batch of {batch_size}, got {rows.min()}..{rows.max()}.")
  if source.info.get("text") is not None:
    return _iterate(_TextBatches(LengthBucketedBatches(source.data, batch_size, seed), rows, start), workers, 1)
  if repeated_augmentation > 1:
    order = RepeatedAugmentation(source.data, repeated_augmentation, seed)
  else:
    order = Shuffled(len(source.data), seed, whole_epochs=isinstance(source.data, Columns))
  ops, device_op = preprocess.split_device(pp) if on_device else (preprocess.parse(pp), None)
  batches = _ImageBatches(source.data, order, ops, seed + 1, batch_size, rows, start, device_op is not None)
  return _iterate(batches, workers, 2)


class _EvalBatches:
  """Batch k of an evaluation: examples `k * batch_size + rows`, the rows past the end zeros with mask 0."""

  def __init__(self, source: Source, ops, batch_size: int, rows: np.ndarray, on_device: bool):
    self.source, self.ops, self.batch_size, self.rows, self.on_device = source, ops, batch_size, rows, on_device

  def __len__(self) -> int:
    return -(-len(self.source) // self.batch_size)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    index = int(k) * self.batch_size + self.rows
    real = index < len(self.source)
    # Padding rows preprocess example 0 (so they have its shapes), then become zeros.
    if isinstance(self.source.data, Columns):
      examples = _keys(self.source.data.take(np.where(real, index, 0)))
    else:
      examples = [_keys(dict(self.source.data[int(i) if ok else 0])) for i, ok in zip(index, real)]
    batch = _finish(preprocess.apply_batch(self.ops, examples, None), self.on_device)
    for v in batch.values():
      v[~real] = 0
    batch["mask"] = real.astype(np.float32)
    return batch


def eval_batches(source: Source, pp: str, batch_size: int, *, rows=None,
                 on_device: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in global batches of `batch_size` with a `mask`; this process's `rows`.

  The last batch is padded (mask 0) rather than dropped.  Every process yields
  the same number of batches, as a multi-host evaluation needs; batch k holds
  examples `k * batch_size + rows` (padding past the end).  Two threads prepare the next batches
  while the device evaluates.  on_device: as in `train_dataset`.
  """
  rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
  ops, device_op = preprocess.split_device(pp) if on_device else (preprocess.parse(pp), None)
  batches = _EvalBatches(source, ops, batch_size, rows, device_op is not None)
  return iter(_iterate(batches, 0, 2))
