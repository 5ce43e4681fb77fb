"""BLEU and chrF: the d2l formula on its worked examples; corpus scores (sacrebleu's) pinned to hand-worked values."""

import math

import pytest

from vit_jax.evaluate import bleu


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
  assert got == pytest.approx(math.e ** (1 - 5 / 4) * (3 / 4) ** 0.5 * (2 / 3) ** 0.25, rel=1e-9)


HYPS = ["the cat sat on the mat", "il est calme ."]
REFS = [["the cat is on the mat", "il est calme ."]]


def test_corpus_bleu_pinned():
  # Corpus counts: 1-grams 9/10, 2-grams 6/8, 3-grams 3/6, 4-grams 1/4; equal lengths, BP = 1.
  score = bleu.corpus_bleu(HYPS, REFS)
  assert score.score == pytest.approx(100 * (0.9 * 0.75 * 0.5 * 0.25) ** 0.25, abs=1e-9)
  assert score.precisions == pytest.approx([90.0, 75.0, 50.0, 25.0])
  assert (score.sys_len, score.ref_len, score.bp) == (10, 10, 1.0)
  # A shorter hypothesis pays the brevity penalty exp(1 - r / c): "the cat" against 6 reference words.
  short = bleu.corpus_bleu(["the cat"], [["the cat is on the mat"]], effective_order=True)
  assert short.bp == pytest.approx(math.exp(1 - 6 / 2))
  assert short.score == pytest.approx(100 * math.exp(1 - 6 / 2), abs=1e-9)  # p1 = p2 = 1


def test_corpus_bleu_options():
  # Lowercased, "a b" matches fully and "x y z" / "x y q" in x, y and "x y": p1 = 4/5, p2 = 2/3; the one
  # 3-gram has no match (smoothed to 100 / (2 * 1)).  No 4-gram in the corpus: 0 under the default
  # signature, the geometric mean of the first three orders with effective order.
  hyps, refs = ["A B", "x y z"], [["a b", "x y q"]]
  assert bleu.corpus_bleu(hyps, refs, lowercase=True).score == 0.0
  eff = bleu.corpus_bleu(hyps, refs, lowercase=True, effective_order=True)
  assert eff.precisions[:3] == pytest.approx([80.0, 200 / 3, 50.0])
  assert eff.score == pytest.approx(100 * (0.8 * (2 / 3) * 0.5) ** (1 / 3), abs=1e-9)
  assert bleu.corpus_bleu(hyps, refs, effective_order=True).precisions[0] == pytest.approx(40.0)  # mixed case: only x, y
  # Characters as tokens; a 3-gram with no match is smoothed to 100 / (2 * 1) under "exp", 0 under "none".
  char = bleu.corpus_bleu(["abc"], [["abd"]], tokenize="char", effective_order=True)
  assert char.precisions[:3] == pytest.approx([200 / 3, 50.0, 50.0])
  none = bleu.corpus_bleu(["abc"], [["abd"]], tokenize="char", smooth="none", effective_order=True)
  assert none.score == 0.0 and char.score == pytest.approx(100 * ((2 / 3) * 0.5 * 0.5) ** (1 / 3), abs=1e-9)
  # Two reference streams: each n-gram is clipped by its largest count in any reference.
  two = bleu.corpus_bleu(["the the cat"], [["the cat"], ["the the dog"]], effective_order=True)
  assert two.precisions[:2] == pytest.approx([100.0, 100.0])  # "the" x2 and "the the" from the second
  one = bleu.corpus_bleu(["the the cat"], [["the cat"]], effective_order=True)
  assert one.precisions[:2] == pytest.approx([200 / 3, 50.0])


def test_corpus_chrf_pinned():
  # "ab" vs "abc": 1-grams P 2/2, R 2/3; 2-grams P 1/1, R 1/2; "ab" has no 3-grams, so orders 3..6 are
  # left out.  P = 1, R = 7/12, F2 = 5 P R / (4 P + R) = 35 / 55.
  assert bleu.corpus_chrf(["ab"], [["abc"]]).score == pytest.approx(100 * 35 / 55, abs=1e-9)
  assert bleu.corpus_chrf(["il est calme ."], [["il est calme ."]]).score == pytest.approx(100.0)
  assert bleu.corpus_chrf(HYPS, REFS).score == pytest.approx(77.68, abs=5e-3)
  # With two references the sentence takes its better one.
  assert bleu.corpus_chrf(["ab"], [["xyz"], ["abc"]]).score == pytest.approx(100 * 35 / 55, abs=1e-9)


def test_bad_arguments_name_the_fix():
  with pytest.raises(TypeError, match="list of reference streams"):
    bleu.corpus_bleu(["a b"], ["a b"])
  with pytest.raises(ValueError, match="2 sentences for 1 hypotheses"):
    bleu.corpus_chrf(["a b"], [["a b", "c"]])
  with pytest.raises(ValueError, match="Unknown tokenize='13b'.*'13a'"):
    bleu.corpus_bleu(["a b"], [["a b"]], tokenize="13b")
  with pytest.raises(ValueError, match="Unknown smooth='expo'"):
    bleu.corpus_bleu(["a b"], [["a b"]], smooth="expo")
