"""The notebooks run top to bottom (as CI's notebook runner), draw their figures, and are stored clean."""

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import one_device_flags

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Every notebook and the figures it must write into VIT_JAX_NOTEBOOK_OUT.
FIGURES = {
    "quickstart": ["quickstart_training_curve.png", "quickstart_predictions.png"],
    "attention_maps": ["attention_heads.png", "attention_rollout.png", "swin_windows.png"],
    "mae": ["mae_reconstructions.png", "mae_mask_ratios.png", "igpt_completions.png"],
    "seq2seq": ["seq2seq_alignment.png"],
    "export": ["export_logits.png"],
}


def load(name):
  import nbformat
  return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_listed():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_is_stored_without_outputs_and_installs_itself_in_colab(name):
  nb = load(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.outputs == [] and c.execution_count is None for c in code), "strip the outputs before committing"
  assert "google.colab" in code[0].source and "pip install" in code[0].source


def check_png(path):
  from PIL import Image
  assert path.exists(), f"{path.name} was not written"
  with Image.open(path) as img:
    pixels = np.asarray(img.convert("L"), np.float32)
  assert min(pixels.shape) >= 200, f"{path.name} is only {pixels.shape}"
  assert pixels.std() > 10, f"{path.name} is (nearly) blank"


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws_its_figures(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  # The kernel inherits this environment: one CPU device, as on a laptop, and a private output folder.
  monkeypatch.setenv("XLA_FLAGS", one_device_flags(os.environ.get("XLA_FLAGS", "")))
  monkeypatch.setenv("VIT_JAX_NOTEBOOK_OUT", str(tmp_path))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # its own digits: no race between parallel runs
  nb = load(name)
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError, with the cell and the traceback, if any cell fails
  for figure in FIGURES[name]:
    check_png(tmp_path / figure)
