"""BLEU and chrF: the d2l formula on its worked examples, corpus scores against sacrebleu."""

import random

import pytest

from vit_jax.evaluate import bleu

sacrebleu = pytest.importorskip("sacrebleu")
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402


@pytest.mark.parametrize("pred,label,k,expected", [
    ("A B B C D", "A B C D E F", 2, 0.681477),  # p1 = 4/5, p2 = 3/4, BP = exp(1 - 6/5)
    ("A B B C D", "A B C D E F", 3, 0.594034),
    ("A B B C D", "A B C D E F", 4, 0.0),       # no 4-gram matches
    ("A B", "A B C D E F", 2, 0.135335),        # exp(-2)
    ("il est riche .", "il est calme .", 2, 0.658037),
    ("je suis en retard ?", "je suis chez moi .", 2, 0.447214),
    ("A B C D E F G H", "A B C D", 2, 0.572125),  # no brevity penalty for a longer prediction
    ("va !", "va !", 4, 1.0),                   # orders longer than the prediction are skipped
    ("", "va !", 2, 0.0),
])
def test_d2l_bleu_worked_examples(pred, label, k, expected):
  assert bleu.d2l_bleu(pred, label, k) == pytest.approx(expected, abs=1e-6)


def test_d2l_bleu_against_the_formula():
  # p1 = 3/4 (the second "le" is clipped), p2 = 2/3; BP = exp(1 - 5/4).
  got = bleu.d2l_bleu("le le chat dort", "le chat dort sur lit", 2)
  assert got == pytest.approx(2.718281828 ** (1 - 5 / 4) * (3 / 4) ** 0.5 * (2 / 3) ** 0.25, rel=1e-9)


def test_13a_tokenizer_matches_sacrebleu():
  tok = Tokenizer13a()
  for line in ["Va ! J'ai perdu. Il est calme, oui? 1,5 l'été", "a-4 x&amp;y (z) 12.3.", "", "1-2 {a}[b]~|"]:
    assert bleu.tokenize_13a(line) == tok(line)


def _random_corpus(rng, n):
  words = "le la chat chien mange pomme rouge grand il est calme . , ! ? 1,5 l'été A-4 12.3 &amp; (x) Été".split()
  sentence = lambda lo: " ".join(rng.choice(words) for _ in range(rng.randint(lo, 14)))
  refs = [sentence(0) for _ in range(n)]
  hyps = [r if rng.random() < 0.3 else sentence(0) for r in refs]
  return hyps, refs, [sentence(1) for _ in range(n)]


@pytest.mark.parametrize("options", [
    {}, {"tokenize": "char"}, {"tokenize": "none"}, {"lowercase": True}, {"smooth": "none"},
    {"effective_order": True}])
def test_corpus_bleu_equals_sacrebleu(options):
  rng = random.Random(0)
  theirs = dict(options)
  if "smooth" in theirs:
    theirs["smooth_method"] = theirs.pop("smooth")
  if "effective_order" in theirs:
    theirs["use_effective_order"] = theirs.pop("effective_order")
  nonzero = 0
  for _ in range(60):
    hyps, refs, refs2 = _random_corpus(rng, rng.randint(1, 10))
    for streams in ([refs], [refs, refs2]):
      ours = bleu.corpus_bleu(hyps, streams, **options)
      ref = sacrebleu.corpus_bleu(hyps, streams, **theirs)
      assert ours.score == pytest.approx(ref.score, abs=1e-6)
      assert (ours.sys_len, ours.ref_len) == (ref.sys_len, ref.ref_len)
      nonzero += ours.score > 0
  assert nonzero > 30  # the comparison is not between zeros


def test_corpus_bleu_reference_value():
  score = bleu.corpus_bleu(["the cat sat on the mat", "il est calme ."],
                           [["the cat is on the mat", "il est calme ."]])
  assert score.score == pytest.approx(53.90, abs=5e-3)
  assert score.precisions == pytest.approx((90.0, 75.0, 50.0, 25.0))


def test_corpus_chrf_equals_sacrebleu():
  rng = random.Random(1)
  for _ in range(60):
    hyps, refs, refs2 = _random_corpus(rng, rng.randint(1, 10))
    for streams in ([refs], [refs, refs2]):
      assert bleu.corpus_chrf(hyps, streams).score == pytest.approx(
          sacrebleu.corpus_chrf(hyps, streams).score, abs=1e-6)


def test_reference_streams_are_checked():
  with pytest.raises(TypeError, match="list of reference streams"):
    bleu.corpus_bleu(["a b"], ["a b"])
  with pytest.raises(ValueError, match="2 sentences for 1 hypotheses"):
    bleu.corpus_bleu(["a b"], [["a b", "c"]])
