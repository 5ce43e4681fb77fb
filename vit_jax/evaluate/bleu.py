"""Translation metrics: the d2l sentence BLEU, and corpus BLEU / chrF computed as sacrebleu does.

    d2l_bleu("A B B C D", "A B C D E F", k=2)               # 0.6815
    corpus_bleu(hypotheses, [references]).score             # 0..100, sacrebleu's defaults
    corpus_chrf(hypotheses, [references]).score             # chrF2 over character 1..6-grams

`corpus_bleu` sums clipped n-gram matches over the whole corpus before taking the geometric mean, so it
is not the mean of sentence scores.  Its defaults (13a tokenisation, mixed case, exponential smoothing,
4-gram, no effective order) give the scores sacrebleu 2.x prints with its default signature.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence

# 13a (mteval-v13a): ASCII punctuation and symbols are split off; periods and commas only where they do
# not sit between digits; a hyphen after a digit is split off.
_SYMBOLS = "".join(sorted(set("{|}~[\\]^_` !\"#$%&()*+:;<=>?@/")))
_13A_RULES = (
    (re.compile("([" + re.escape(_SYMBOLS) + "])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> str:
  """The WMT mteval-v13a tokenisation, tokens joined by single spaces."""
  if not line:
    return ""
  line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
  if "&" in line:
    for entity, char in _ENTITIES:
      line = line.replace(entity, char)
  line = f" {line} "
  for pattern, replacement in _13A_RULES:
    line = pattern.sub(replacement, line)
  return " ".join(line.split())


TOKENIZERS = {
    "13a": tokenize_13a,
    "none": lambda line: line,
    "char": lambda line: " ".join(line.replace(" ", "")),  # every character a token, spaces dropped
}


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


@dataclasses.dataclass(frozen=True)
class BleuScore:
  score: float                   # 0..100
  precisions: tuple[float, ...]  # per order, in percent, after smoothing
  brevity_penalty: float
  sys_len: int
  ref_len: int
  counts: tuple[int, ...]        # clipped matches per order
  totals: tuple[int, ...]        # hypothesis n-grams per order

  def __str__(self):
    p = "/".join(f"{x:.1f}" for x in self.precisions)
    return (f"BLEU = {self.score:.2f} {p} (BP = {self.brevity_penalty:.3f} "
            f"ratio = {self.sys_len / max(self.ref_len, 1):.3f} hyp_len = {self.sys_len} ref_len = {self.ref_len})")


def _reference_streams(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
  """Per hypothesis, its references.  `references` is a list of streams, each parallel to the hypotheses."""
  if isinstance(references, str) or (references and isinstance(references[0], str)):
    raise TypeError("references must be a list of reference streams, e.g. [refs] for one reference each.")
  for stream in references:
    if len(stream) != len(hypotheses):
      raise ValueError(f"A reference stream has {len(stream)} sentences for {len(hypotheses)} hypotheses.")
  return [list(refs) for refs in zip(*references)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, max_order: int = 4,
                tokenize: str = "13a", lowercase: bool = False, smooth: str = "exp",
                effective_order: bool = False) -> BleuScore:
  """Corpus BLEU (Papineni et al. 2002) with sacrebleu's conventions.

  Clipped n-gram matches and hypothesis n-gram totals are summed over the corpus; the reference length
  of each sentence is the closest reference length (the shorter one on ties); BP = exp(1 - r/c) when
  c < r.  `smooth`: "exp" halves the precision of each further order with no match (mteval's smoothing),
  "none" leaves it 0.  `effective_order` stops the geometric mean at the longest order the corpus has.
  """
  if smooth not in ("exp", "none"):
    raise ValueError(f"Unknown smooth={smooth!r}: choose 'exp' or 'none'.")
  if tokenize not in TOKENIZERS:
    raise ValueError(f"Unknown tokenize={tokenize!r}: choose one of {sorted(TOKENIZERS)}.")
  tok = TOKENIZERS[tokenize]
  prep = (lambda s: tok(s.lower())) if lowercase else tok
  counts, totals = [0] * max_order, [0] * max_order
  sys_len = ref_len = 0
  for hyp, refs in zip(hypotheses, _reference_streams(hypotheses, references)):
    hyp_tokens = prep(hyp).split()
    ref_tokens = [prep(r).split() for r in refs]
    sys_len += len(hyp_tokens)
    ref_len += min((abs(len(r) - len(hyp_tokens)), len(r)) for r in ref_tokens)[1]
    for n in range(1, max_order + 1):
      hyp_grams = _ngrams(hyp_tokens, n)
      max_ref = collections.Counter()
      for r in ref_tokens:
        max_ref |= _ngrams(r, n)
      counts[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_grams.items())
      totals[n - 1] += max(len(hyp_tokens) - n + 1, 0)
  if sys_len < ref_len:
    bp = math.exp(1.0 - ref_len / sys_len) if sys_len > 0 else 0.0
  else:
    bp = 1.0
  precisions = [0.0] * max_order
  order, doubling = max_order, 1.0
  for n in range(max_order):
    if totals[n] == 0:
      break
    if effective_order:
      order = n + 1
    if counts[n] == 0 and smooth == "exp":
      doubling *= 2
      precisions[n] = 100.0 / (doubling * totals[n])
    else:
      precisions[n] = 100.0 * counts[n] / totals[n]
  if not any(counts) or min(precisions[:order]) <= 0.0:
    score = 0.0
  else:
    score = bp * math.exp(sum(math.log(p) for p in precisions[:order]) / order)
  return BleuScore(score, tuple(precisions), bp, sys_len, ref_len, tuple(counts), tuple(totals))


@dataclasses.dataclass(frozen=True)
class ChrfScore:
  score: float  # 0..100
  char_order: int
  beta: float

  def __str__(self):
    return f"chrF{self.beta:g} = {self.score:.2f}"


def _char_stats(hyp: str, ref: str, char_order: int) -> list[int]:
  """[hyp n-grams, ref n-grams, matches] per order, whitespace removed (chrF's default)."""
  hyp, ref = "".join(hyp.split()), "".join(ref.split())
  stats = []
  for n in range(1, char_order + 1):
    h, r = _ngrams(hyp, n), _ngrams(ref, n)
    # A hypothesis n-gram counts only where the reference has n-grams of that order (sacrebleu's rule).
    stats += [sum(h.values()) if r else 0, sum(r.values()), sum((h & r).values())]
  return stats


def _chrf_from_stats(stats: Sequence[int], char_order: int, beta: float) -> float:
  """Average precision and recall over the orders both sides have, then their F-beta, in percent."""
  precision = recall = 0.0
  effective = 0
  for n in range(char_order):
    n_hyp, n_ref, n_match = stats[3 * n: 3 * n + 3]
    if n_hyp and n_ref:  # orders one side lacks (short sentences) are left out of both averages
      precision += n_match / n_hyp
      recall += n_match / n_ref
      effective += 1
  if not effective:
    return 0.0
  precision, recall = precision / effective, recall / effective
  if precision + recall == 0:
    return 0.0
  b2 = beta ** 2
  return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, char_order: int = 6,
                beta: float = 2.0) -> ChrfScore:
  """chrF (Popovic 2015) over character n-grams, statistics summed over the corpus as sacrebleu does.

  With several references, each sentence uses the one with the best sentence-level chrF.
  """
  total = [0] * (3 * char_order)
  for hyp, refs in zip(hypotheses, _reference_streams(hypotheses, references)):
    best = max((_char_stats(hyp, r, char_order) for r in refs),
               key=lambda s: _chrf_from_stats(s, char_order, beta))
    total = [a + b for a, b in zip(total, best)]
  return ChrfScore(_chrf_from_stats(total, char_order, beta), char_order, beta)
