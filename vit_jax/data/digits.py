"""scikit-learn's bundled handwritten digits as a TFDS dataset, prepared offline.

1797 real 8x8 grey-scale scans (UCI optdigits, 16 grey levels) ship inside
scikit-learn, so this dataset needs no network.  Pixels are scaled from 0..16
to 0..255 (uint8) like any other image dataset.  The split is fixed: a
stratified 360-image test split (scikit-learn, random_state=0) and 1437 for
training.

    builder = prepare(data_dir)                     # array_record files, once
    tfds.data_source("sklearn_digits", split="train", data_dir=data_dir)

`write_folder(root)` (command line: `python -m vit_jax.data.digits_folder`) writes
the same split as an image folder.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
TEST_SIZE = 360


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """The scikit-learn digits (8x8x1 uint8 images, 10 classes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 1437 / 360 train / test split (random_state=0)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Tensor, not Image: encoding PNGs would need TensorFlow.
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # bundled with scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = np.round(x.reshape(-1, 8, 8, 1) * (255.0 / 16.0)).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=0)
    return {"train": self._generate_examples(images, y, np.sort(idx_train)),
            "test": self._generate_examples(images, y, np.sort(idx_test))}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepare the dataset under `data_dir` (TFDS's default when None) if it is not there yet."""
  builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    tfds.display_progress_bar(False)  # a second of work: no progress bars
    try:
      builder.download_and_prepare()
    except FileExistsError:  # another process (another host of the job) finished first: use its copy
      builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        raise
  return builder


def write_folder(root: str, data_dir: str | None = None) -> dict[str, int]:
  """Both splits as grey 8x8 PNGs under `root/{train,test}/<digit>/`; returns the image count per split."""
  from PIL import Image

  builder = prepare(data_dir)
  counts = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      example = source[i]
      folder = os.path.join(root, split, str(int(example["label"])))
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(np.asarray(example["image"])[..., 0]).save(os.path.join(folder, f"{i:04d}.png"))
    counts[split] = len(source)
  return counts
