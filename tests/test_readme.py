"""The README's commands: blocks marked runnable run as written; every other command names what runs it.

A fenced block preceded by the line `<!-- runnable -->` (or `<!-- runnable: expect "TEXT" -->`, which
also requires TEXT in the output) is run verbatim (bash blocks with bash, python blocks with the test
environment's python) in a fresh directory that links main.py, configs/, vit_jax/ and bench/, so the
commands' relative paths and work directories behave as in a checkout.  Other
shell blocks hold commands that need data or hardware this machine lacks, or take too long for the
suite; COVERED says which test or notebook runs each of them (or the same code on small inputs).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_device_flags

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r'^<!-- runnable(?:: expect "(?P<expect>[^"]+)")? -->$')
LINKED = ("main.py", "configs", "vit_jax", "bench")

# A command's distinctive text -> where it is exercised.  Every shell command of a block that is
# not runnable must contain one of these keys.
COVERED = {
    "make demo": "tests/test_readme.py (`python main.py`, what `make demo` runs)",
    "make test": "CI (.ci/run)",
    "jupyter execute": "tests/test_notebooks.py::test_notebook_runs_and_draws_its_figures (the same runner)",
    "make test-timm": "tests/test_interop_timm.py (with timm installed)",
    "configs/igpt.py": "tests/test_igpt.py::test_igpt_pretrains_on_the_digits_through_the_trainer",
    "vit_jax.evaluate.complete": "tests/test_igpt.py::test_igpt_pretrains_on_the_digits_through_the_trainer; "
                                 "notebooks/mae.ipynb",
    "configs/swin.py": "tests/test_swin.py::test_configs_swin_distils_through_the_trainer_with_layer_decay",
    "configs/mae.py": "tests/test_mae.py::test_pretrain_finetune_linear_probe_chain; notebooks/mae.ipynb",
    "vit_jax.evaluate.reconstruct": "tests/test_mae.py::test_pretrain_finetune_linear_probe_chain",
    "dataset=cifar10": "tests/test_train.py::test_tfds_dataset_by_name_trains_end_to_end_on_mock_data",
    "init=ViT-B_16.npz": "tests/test_train.py::test_fine_tune_at_new_resolution_and_class_count",
    "gcloud compute tpus": "tests/test_multihost.py (the same program as 2 processes joined by jax.distributed)",
    "srun ": "tests/test_multihost.py (the same program as 2 processes joined by jax.distributed)",
    "--coordinator_address": "tests/test_multihost.py (the launcher passes the same settings as environment)",
    "vit_jax.launch": "tests/test_multihost.py (every multi-process test runs through vit_jax.launch.Job)",
    "bench/memory.py": "tests/test_bench.py::test_bench_script_prints_its_table (smallest inputs)",
    "configs/deit.py": "tests/test_teacher.py::test_distillation_trains_with_a_teacher_checkpoint_and_ema",
    "vit_jax.data.score_maps": "tests/test_teacher.py::test_token_labeling_trains_on_generated_score_maps",
    "configs/lvvit.py": "tests/test_teacher.py::test_token_labeling_trains_on_generated_score_maps",
    "--workdir workdirs/teacher": "tests/test_readme.py (the demo)",
    "configs/seq2seq.py": "tests/test_seq2seq_train.py::test_seq2seq_trains_and_translates; notebooks/seq2seq.ipynb",
    "vit_jax.translate": "tests/test_seq2seq_train.py::test_seq2seq_trains_and_translates",
    "configs/birnn.py": "tests/test_seq2seq_train.py::test_birnn_digits_classifier",
    "vit_jax.interop.convert": "tests/test_convert.py::test_command_line_entry_point; notebooks/export.ipynb",
    "--config.init.path=model.pth": "tests/test_torch_import.py::test_main_fine_tunes_from_a_pth_file",
    "init=mae_pretrain_vit_base.pth": "tests/test_torch_releases.py::test_trainer_fine_tunes_an_mae_release",
    "--input lvvit_s": "tests/test_torch_releases.py::test_convert_releases_keeps_what_each_target_can_hold",
    "--input mae_visualize": "tests/test_torch_releases.py::test_convert_releases_keeps_what_each_target_can_hold",
    "bench/vit_step.py": "tests/test_bench.py::test_bench_script_prints_its_table (smallest inputs)",
    "bench/decode.py": "tests/test_bench.py::test_bench_script_prints_its_table (smallest inputs)",
    "bench/seq2seq_step.py": "tests/test_bench.py::test_bench_script_prints_its_table (smallest inputs)",
    # Timing and multi-run studies of minutes each (`make bench`), built from pieces tested elsewhere.
    "bench/swin_step.py": "tests/test_swin.py (the model and the Hugging Face model it times)",
    "bench/mae_step.py": "tests/test_mae.py (the MAE step it times, in the trainer)",
    "bench/input_pipeline.py": "tests/test_data.py (the pipeline), tests/test_train.py (the step)",
    "bench/mae_digits.py": "tests/test_mae.py::test_pretrain_finetune_linear_probe_chain (the same runs, tiny)",
    "bench/igpt_digits.py": "tests/test_igpt.py::test_igpt_pretrains_on_the_digits_through_the_trainer (pre-training, "
                            "fine-tuning; the probe features against Hugging Face in the same file)",
    "bench/pixels_as_tokens.py": "tests/test_train.py::test_training_writes_metrics_checkpoints_and_config (the runs "
                                 "it repeats at other patch sizes)",
    "bench/teacher_digits.py": "tests/test_teacher.py (the same runs, tiny)",
    "bench/qk_norm_stability.py": "tests/test_block_options.py (QK-norm against torch; the options in the trainer)",
    "bench/augreg_digits.py": "tests/test_randaug.py::test_augreg_settings_in_the_vit_config (the settings), "
                              "tests/test_train.py::test_training_writes_metrics_checkpoints_and_config (the runs)",
    "bench/precision_digits.py": "tests/test_precision.py (bfloat16 compute, float32 statistics and state)",
    "bench/demo_ab.py": "tests/test_readme.py (the demo it runs at two revisions)",
    "bench/compile_cache.py": "tests/test_runtime.py::test_a_second_start_loads_every_program_from_the_cache",
    "bench/peg_resolution.py":
        "tests/test_block_options.py::test_trainer_runs_the_options_on_a_data_by_tensor_mesh_and_the_peg_model_grows "
        "(its evaluation at a larger size)",
}


def blocks():
  """(language, code, runnable, expected output or None) for every fenced block of the README, in order."""
  lines = README.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^```(\w*)", lines[i])
    if not m:
      i += 1
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
    mark = MARK.match(lines[i - 1].strip()) if i > 0 else None
    out.append((m.group(1), "\n".join(lines[i + 1:end]), bool(mark), mark and mark.group("expect")))
    i = end + 1
  return out


def commands(code):
  """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
  joined = re.sub(r"\\\n\s*", " ", code)
  return [line.split(" # ")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


RUNNABLE = [(lang, code, expect) for lang, code, runnable, expect in blocks() if runnable]


def test_marked_blocks_are_shell_or_python_and_the_marker_is_used():
  assert len(RUNNABLE) >= 4
  assert all(lang in ("bash", "python") for lang, _, _ in RUNNABLE)
  marks = [line for line in README.read_text().splitlines() if line.startswith("<!-- runnable")]
  assert all(MARK.match(line) for line in marks), marks
  assert len(marks) == len(RUNNABLE), "a runnable mark must sit right above a fence"


def test_every_other_shell_command_names_what_runs_it():
  missing = []
  for lang, code, runnable, _ in blocks():
    if lang != "bash" or runnable:
      continue
    missing += [c for c in commands(code) if not any(key in c for key in COVERED)]
  assert not missing, f"README commands that nothing runs (mark the block runnable or add them to COVERED): {missing}"


def test_covered_tests_exist():
  for where in COVERED.values():
    for ref in re.findall(r"(tests/[\w/]+\.py|notebooks/\w+\.ipynb)(?:::(\w+))?", where):
      path, name = ref
      assert (ROOT / path).exists(), path
      if name:
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(RUNNABLE)), ids=lambda i: f"block{i}-{RUNNABLE[i][0]}")
def test_runnable_block(index, tmp_path):
  lang, code, expect = RUNNABLE[index]
  for name in LINKED:
    (tmp_path / name).symlink_to(ROOT / name)
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` is this one
  env["XLA_FLAGS"] = one_device_flags(env.get("XLA_FLAGS", ""))  # one device, as a user has
  env["PYTHONPATH"] = str(tmp_path)
  env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")  # the digits are prepared here, not in the user's home
  argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
  done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  output = done.stdout + done.stderr
  assert done.returncode == 0, f"README block failed ({done.returncode}):\n{code}\n---\n{output[-4000:]}"
  assert "Traceback" not in output, output[-4000:]
  if expect:
    assert expect in output, f"README block output lacks {expect!r}:\n{output[-4000:]}"
