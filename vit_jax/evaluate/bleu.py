"""Translation metrics: corpus BLEU and chrF from sacrebleu, and the d2l sentence BLEU.

    corpus_bleu(hypotheses, [references]).score             # 0..100, sacrebleu's default signature
    corpus_chrf(hypotheses, [references]).score             # chrF2 over character 1..6-grams
    d2l_bleu("A B B C D", "A B C D E F", k=2)               # 0.6815

Corpus BLEU and chrF are sacrebleu's own (the scores papers report, with its signature); these wrappers
only check the reference streams and name sacrebleu's options the way the rest of the code does.
`corpus_bleu` sums clipped n-gram matches over the whole corpus before taking the geometric mean, so it
is not the mean of sentence scores.  `d2l_bleu` is the per-sentence formula of Dive into Deep Learning,
which sacrebleu does not define.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

SMOOTHING = ("exp", "none", "floor", "add-k")


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def d2l_bleu(prediction: str, label: str, k: int = 2) -> float:
  """exp(min(0, 1 - len_label / len_pred)) * prod_{n<=k} p_n^(1/2^n), tokens split on single spaces.

  As in Dive into Deep Learning: orders longer than the prediction are skipped (a factor of 1), and
  any evaluated order with no clipped match gives 0.  An empty prediction is one empty token.
  """
  pred, ref = prediction.split(" "), label.split(" ")
  score = math.exp(min(0.0, 1.0 - len(ref) / len(pred)))
  for n in range(1, min(k, len(pred)) + 1):
    available = _ngrams(ref, n)
    matches = 0
    for gram in (tuple(pred[i:i + n]) for i in range(len(pred) - n + 1)):
      if available[gram] > 0:
        matches += 1
        available[gram] -= 1
    score *= (matches / (len(pred) - n + 1)) ** (0.5 ** n)
  return score


def _streams(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
  """The reference streams (each parallel to the hypotheses) as lists, checked."""
  if isinstance(references, str) or (references and isinstance(references[0], str)):
    raise TypeError("references must be a list of reference streams, e.g. [refs] for one reference each.")
  streams = [list(stream) for stream in references]
  for stream in streams:
    if len(stream) != len(hypotheses):
      raise ValueError(f"A reference stream has {len(stream)} sentences for {len(hypotheses)} hypotheses.")
  return streams


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, tokenize: str = "13a",
                lowercase: bool = False, smooth: str = "exp", effective_order: bool = False):
  """sacrebleu's corpus BLEU (a `BLEUScore`: `.score` 0..100, `.precisions`, `.bp`, `.sys_len`, ...).

  Defaults are sacrebleu's signature (13a tokenisation, mixed case, exponential smoothing, 4-gram, no
  effective order); `tokenize` is any of sacrebleu's tokenisers ("13a", "char", "none", "intl", ...).
  """
  import sacrebleu  # noqa: PLC0415

  if smooth not in SMOOTHING:
    raise ValueError(f"Unknown smooth={smooth!r}: choose one of {SMOOTHING}.")
  if tokenize not in sacrebleu.BLEU.TOKENIZERS:
    raise ValueError(f"Unknown tokenize={tokenize!r}: choose one of {sorted(sacrebleu.BLEU.TOKENIZERS)}.")
  metric = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth,
                          effective_order=effective_order)
  return metric.corpus_score(list(hypotheses), _streams(hypotheses, references))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, char_order: int = 6,
                beta: float = 2.0):
  """sacrebleu's corpus chrF (Popovic 2015; a `CHRFScore`, `.score` 0..100): character n-gram statistics
  summed over the corpus, whitespace removed; with several references each sentence uses its best one."""
  import sacrebleu  # noqa: PLC0415

  metric = sacrebleu.CHRF(char_order=char_order, beta=beta)
  return metric.corpus_score(list(hypotheses), _streams(hypotheses, references))
