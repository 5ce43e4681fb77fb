"""Translate with a trained seq2seq checkpoint, or score it on its held-out split.

    echo "forty-two" | python -m vit_jax.translate --workdir workdirs/s2s_luong
    python -m vit_jax.translate --workdir DIR --beam 4 --alpha 0.6 < english.txt > french.txt
    python -m vit_jax.translate --workdir DIR --evaluate [--json results.json]
    python -m vit_jax.translate --workdir DIR --plot alignment.png < one_sentence.txt

Reads one source sentence per line from stdin and writes one translation per line (greedy decoding, or
beam search with `--beam K`).  `--evaluate` rebuilds the run's data split from its config.json and prints
exact match, corpus BLEU and chrF on the held-out pairs, overall and by source length (thirds).
`--plot` draws the first sentence's attention (target characters down, source across) as a PNG.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint, decode
from vit_jax.data import text
from vit_jax.models.seq2seq import Seq2Seq


class Translator:
  """A checkpoint's model, vocabularies and jitted decoders."""

  def __init__(self, workdir: str):
    variables, saved = checkpoint.load_variables(workdir)
    if saved.get("task") != "seq2seq":
      raise ValueError(f"{workdir!r} holds a {saved.get('task')!r} checkpoint, not a seq2seq one.")
    self.source_vocab = text.Vocab(tuple(saved["source_vocab"]["tokens"]), saved["source_vocab"]["level"])
    self.target_vocab = text.Vocab(tuple(saved["target_vocab"]["tokens"]), saved["target_vocab"]["level"])
    self.target_len = int(saved["target_len"])
    self.source_len = int(saved.get("source_len") or 0)  # the longest source seen in training
    self.model = Seq2Seq(**saved["model"])
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self._fns: dict[tuple, Any] = {}

  def _fn(self, beam: int, alpha: float, max_len: int):
    key = (beam, alpha, max_len)
    if key not in self._fns:
      if beam == 1:
        fn = lambda v, s: decode.greedy(self.model, v, s, max_len=max_len)
      else:
        def fn(v, s):
          out = decode.beam_search(self.model, v, s, max_len=max_len, beam_size=beam, alpha=alpha)
          return out["tokens"], out["weights"]
      self._fns[key] = jax.jit(fn)
    return self._fns[key]

  def encode(self, sentences: Sequence[str]) -> np.ndarray:
    longest = max(len(self.source_vocab.split(s)) for s in sentences)
    width = max(8, -(-longest // 8) * 8)  # a few padded widths, so a few compilations
    if self.model.kind == "transformer" and width > self.model.max_len:
      raise ValueError(f"A sentence of {longest} tokens is longer than the model's max_len {self.model.max_len}.")
    ids, _ = self.source_vocab.encode_batch(list(sentences), width)
    return ids

  def translate(self, sentences: Sequence[str], *, beam: int = 1, alpha: float = 0.6, batch_size: int = 64,
                max_len: int | None = None, return_weights: bool = False):
    """Translations of `sentences` (and the attention weights per sentence, trimmed, with return_weights)."""
    max_len = max_len or self.target_len
    out, weights = [], []
    for start in range(0, len(sentences), batch_size):
      chunk = list(sentences[start:start + batch_size])
      ids = self.encode(chunk)
      n = len(chunk)
      ids = np.concatenate([ids, np.zeros((batch_size - n, ids.shape[1]), np.int32)]) if n < batch_size else ids
      ids[n:, 0] = text.UNK_ID  # padding rows: one token, so no empty source
      tokens, w = jax.device_get(self._fn(beam, alpha, max_len)(self.variables, jnp.asarray(ids)))
      for row in range(n):
        out.append(self.target_vocab.decode(tokens[row]))
        if return_weights:
          length = int(np.sum(tokens[row] != 0))
          weights.append(w[row, :length, :len(self.source_vocab.split(chunk[row]))])
    return (out, weights) if return_weights else out


  def check_inputs(self, sentences: Sequence[str]) -> list[str]:
    """Warnings about `sentences` (unknown tokens, lengths past training); an error past the model's limit."""
    index, unknown, warnings = self.source_vocab.index, collections.Counter(), []
    limit = self.model.max_len if self.model.kind == "transformer" else None
    for n, s in enumerate(sentences, 1):
      tokens = self.source_vocab.split(s)
      unknown.update(t for t in tokens if t not in index)
      if limit is not None and len(tokens) > limit:
        raise ValueError(f"input line {n} is {len(tokens)} tokens, more than this model's limit of {limit} "
                         "(max_len): split it into shorter sentences.")
      if self.source_len and len(tokens) > self.source_len:
        warnings.append(f"input line {n} is {len(tokens)} tokens, longer than the {self.source_len} the model was "
                        "trained on: expect a poor translation")
    if unknown:
      shown = ", ".join(repr(t) for t, _ in unknown.most_common(8))
      warnings.append(f"{sum(unknown.values())} token(s) outside the model's vocabulary were read as unknown: "
                      f"{shown}")
    return warnings


def length_buckets(pairs: Sequence[text.Pair], parts: int = 3) -> list[tuple[str, list[int]]]:
  """Indices of `pairs` in `parts` groups by source length (shortest first), labelled by length range."""
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].source))
  groups = [order[k * len(order) // parts:(k + 1) * len(order) // parts] for k in range(parts)]
  out = []
  for g in groups:
    lo, hi = len(pairs[g[0]].source), len(pairs[g[-1]].source)
    out.append((f"{lo}-{hi} chars", g))
  return out


def evaluate(translator: Translator, pairs: Sequence[text.Pair], hypotheses: Sequence[str]) -> dict[str, Any]:
  """Exact match, BLEU and chrF overall and by source-length third."""
  from vit_jax.evaluate import bleu

  def scores(idx):
    hyps = [hypotheses[i] for i in idx]
    refs = [pairs[i].target for i in idx]
    vocab = translator.target_vocab
    exact = np.mean([vocab.split(h) == vocab.split(r) for h, r in zip(hyps, refs)])
    return {"pairs": len(idx), "exact_match": float(exact), "bleu": bleu.corpus_bleu(hyps, [refs]).score,
            "chrf": bleu.corpus_chrf(hyps, [refs]).score}

  result = {"all": scores(range(len(pairs)))}
  for label, idx in length_buckets(pairs):
    result[label] = scores(idx)
  return result


def heatmap_png(weights: np.ndarray, source: str, target: str, path: str, cell: int = 12) -> str:
  """The attention matrix (rows: target tokens, columns: source tokens) with labels, as a PNG."""
  from PIL import Image, ImageDraw

  rows, cols = weights.shape
  margin = 14
  img = Image.new("RGB", (margin + cols * cell + 1, margin + rows * cell + 1), "white")
  draw = ImageDraw.Draw(img)
  peak = max(float(weights.max()), 1e-9)
  for r in range(rows):
    for c in range(cols):
      v = int(255 * (1.0 - weights[r, c] / peak))
      draw.rectangle([margin + c * cell, margin + r * cell, margin + (c + 1) * cell - 1, margin + (r + 1) * cell - 1],
                     fill=(v, v, 255))
  for c, ch in enumerate(list(source)[:cols]):
    draw.text((margin + c * cell + 3, 1), ch, fill="black")
  for r, ch in enumerate((list(target) + ["<end>"])[:rows]):
    draw.text((2, margin + r * cell), ch if ch != "<end>" else "$", fill="black")
  from vit_jax import files

  files.write_png(path, img)
  return path


def _format(result: dict[str, Any]) -> str:
  lines = ["| source length | pairs | exact match | BLEU | chrF |", "|---|---|---|---|---|"]
  for label, s in result.items():
    lines.append(f"| {label} | {s['pairs']} | {s['exact_match']:.3f} | {s['bleu']:.1f} | {s['chrf']:.1f} |")
  return "\n".join(lines)


def _positive(type_, name: str, *, zero: bool = False):
  def parse(text: str):
    try:
      value = type_(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
      raise argparse.ArgumentTypeError(f"{name} must be {'>= 0' if zero else 'positive'}, not {text}")
    return value
  return parse


def main(argv: Sequence[str] | None = None) -> int:
  from vit_jax import cli

  parser = cli.ArgumentParser(prog="python -m vit_jax.translate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a seq2seq training directory (or a checkpoint step)")
  parser.add_argument("--beam", type=_positive(int, "--beam"), default=1, help="beam size (1: greedy)")
  parser.add_argument("--alpha", type=_positive(float, "--alpha", zero=True), default=0.6,
                      help="length penalty exponent of beam search")
  parser.add_argument("--batch_size", type=_positive(int, "--batch_size"), default=64)
  parser.add_argument("--evaluate", action="store_true", help="score the held-out split instead of reading stdin")
  parser.add_argument("--json", help="with --evaluate: also write the scores here")
  parser.add_argument("--plot", help="write the first sentence's attention heat map to this PNG")
  args = parser.parse_args(argv)
  try:
    from vit_jax import files
    for out in (args.json, args.plot):
      if out:
        files.check_output(out, args.workdir, overwrite=True, what="output", beside=True)
    translator = Translator(args.workdir)
    if args.evaluate:
      with open(os.path.join(args.workdir, "config.json")) as f:
        data_config = json.load(f)["data"]
      data = text.load_text_data(data_config["name"], **data_config.get("text", {}))
      pairs = list(data.test)
      hyps = translator.translate([p.source for p in pairs], beam=args.beam, alpha=args.alpha,
                                  batch_size=args.batch_size)
      result = evaluate(translator, pairs, hyps)
      print(f"{len(data.train)} training pairs, {len(pairs)} held-out; decoding: "
            f"{'greedy' if args.beam == 1 else f'beam {args.beam}, alpha {args.alpha}'}")
      print(_format(result))
      if args.json:
        files.write_atomic(args.json, json.dumps(result, indent=2))
      return 0
    lines = [line.rstrip("\r\n") for line in sys.stdin]
    sentences = [line for line in lines if line.strip()]  # blank lines stay blank in the output
    for warning in translator.check_inputs(lines):  # numbered as the input lines
      print(f"warning: {warning}", file=sys.stderr)
    out = translator.translate(sentences, beam=args.beam, alpha=args.alpha, batch_size=args.batch_size,
                               return_weights=bool(args.plot)) if sentences else []
    if args.plot and sentences:
      out, weights = out
      heatmap_png(weights[0], sentences[0], out[0], args.plot)
    translations = iter(out)
    for line in lines:
      print(next(translations) if line.strip() else "")
  except (*cli.INPUT_ERRORS, checkpoint.CheckpointError) as e:
    return cli.fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
