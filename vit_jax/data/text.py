"""English-French sentence pairs: the Tatoeba / manythings `fra.txt` reader and vocabularies.

    pairs = read_pairs("fra.txt")                        # or the downloaded fra-eng.zip
    train, test = split_by_source(pairs, test_fraction=0.1, seed=0)
    src_vocab = Vocab.build([p.source for p in train], level="char")
    ids, lengths = src_vocab.encode_batch([p.source for p in train], max_len=64)

`fra.txt` holds one pair per line: English, a tab, French and, in newer files, a tab and the Tatoeba
attribution.  It is sorted by length and many English sentences have several translations, so the split
is by unique English sentence: no source in the test split appears in training.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import os
import random
import re
import zipfile
from collections.abc import Iterable, Sequence

import numpy as np

PAD, START, END, UNK = "<pad>", "\t", "\n", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0..3 in every vocabulary
PAD_ID, START_ID, END_ID, UNK_ID = range(4)


@dataclasses.dataclass(frozen=True)
class Pair:
  source: str
  target: str
  attribution: str = ""


def _lines(path: str) -> Iterable[str]:
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      names = [n for n in z.namelist() if n.endswith(".txt") and not os.path.basename(n).startswith("_")]
      if len(names) != 1:
        raise ValueError(f"{path}: expected one pairs file (e.g. fra.txt) in the zip, found {names}.")
      with z.open(names[0]) as f:
        yield from io.TextIOWrapper(f, encoding="utf-8")
  else:
    with open(path, encoding="utf-8") as f:
      yield from f


def normalize_spaces(text: str) -> str:
  """French typography's narrow and non-breaking spaces (U+202F, U+00A0) as plain spaces."""
  return text.replace("\u202f", " ").replace("\xa0", " ")


def read_pairs(path: str, limit: int | None = None, plain_spaces: bool = False) -> list[Pair]:
  """Pairs from a tab-separated file (2 or 3 columns) or a zip holding one; empty lines are skipped."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No sentence-pair file at {path!r}: pass the path of fra.txt (or fra-eng.zip), "
                            "or generate a corpus with `python -m vit_jax.data.text --out FILE`.")
  pairs = []
  for number, line in enumerate(_lines(path), 1):
    line = line.rstrip("\r\n")
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 2:
      raise ValueError(f"{path}:{number}: expected 'English<TAB>French[<TAB>attribution]', got {line[:80]!r}.")
    source, target = fields[0].strip(), fields[1].strip()
    if plain_spaces:
      source, target = normalize_spaces(source), normalize_spaces(target)
    pairs.append(Pair(source, target, fields[2] if len(fields) > 2 else ""))
    if limit is not None and len(pairs) >= limit:
      break
  if not pairs:
    raise ValueError(f"{path}: no sentence pairs.")
  return pairs


def write_pairs(path: str, pairs: Iterable[Pair]) -> None:
  """The same 3-column format; written to a temporary name and renamed, so a crash leaves no half file."""
  from vit_jax.files import write_atomic

  lines = []
  for p in pairs:
    if any(c in s for s in (p.source, p.target, p.attribution) for c in "\t\n"):
      raise ValueError(f"A pair contains a tab or newline: {p}.")
    lines.append(f"{p.source}\t{p.target}\t{p.attribution}\n")
  write_atomic(path, "".join(lines))


def split_by_source(pairs: Sequence[Pair], test_fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
  """(train, test): unique sources shuffled with `seed`; every pair of a source lands on the same side."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  sources = sorted({p.source for p in pairs})
  random.Random(seed).shuffle(sources)
  held_out = set(sources[:max(1, round(len(sources) * test_fraction))])
  train = [p for p in pairs if p.source not in held_out]
  test = [p for p in pairs if p.source in held_out]
  return train, test


_PUNCT_SPACE = re.compile(r"(?<=\S)([,.!?])")


def word_tokens(text: str) -> list[str]:
  """d2l's word tokenisation: plain spaces, lower case, punctuation split off."""
  return _PUNCT_SPACE.sub(r" \1", normalize_spaces(text).lower()).split()


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token <-> id.  Ids 0..3 are padding, start ('\\t'), end ('\\n') and unknown; the rest sorted."""
  tokens: tuple[str, ...]
  level: str = "char"  # "char" or "word"

  @classmethod
  def build(cls, texts: Iterable[str], level: str = "char", min_freq: int = 1) -> Vocab:
    if level not in ("char", "word"):
      raise ValueError(f"Unknown vocabulary level {level!r}: choose 'char' or 'word'.")
    counts = collections.Counter()
    for text in texts:
      counts.update(text if level == "char" else word_tokens(text))
    kept = sorted(t for t, c in counts.items() if c >= min_freq and t not in SPECIALS)
    return cls(SPECIALS + tuple(kept), level)

  def __len__(self):
    return len(self.tokens)

  @property
  def index(self) -> dict[str, int]:
    return {t: i for i, t in enumerate(self.tokens)}

  def split(self, text: str) -> list[str]:
    return list(text) if self.level == "char" else word_tokens(text)

  def encode(self, text: str, start: bool = False, end: bool = False) -> list[int]:
    index = self.index
    ids = [index.get(t, UNK_ID) for t in self.split(text)]
    return [START_ID] * start + ids + [END_ID] * end

  def decode(self, ids: Iterable[int]) -> str:
    """Tokens up to the first end marker; padding and the start marker are dropped."""
    out = []
    for i in ids:
      i = int(i)
      if i == END_ID:
        break
      if i in (PAD_ID, START_ID):
        continue
      out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
    return "".join(out) if self.level == "char" else " ".join(out)

  def encode_batch(self, texts: Sequence[str], max_len: int, start: bool = False,
                   end: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids [N, max_len] int32 (0-padded) and lengths [N]; a text longer than max_len is an error."""
    ids = np.zeros((len(texts), max_len), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for n, text in enumerate(texts):
      row = self.encode(text, start, end)
      if len(row) > max_len:
        raise ValueError(f"{text[:60]!r} is {len(row)} tokens with markers, more than max_len={max_len}; "
                         "raise max_len or filter long pairs.")
      ids[n, :len(row)], lengths[n] = row, len(row)
    return ids, lengths

  def save(self, path: str) -> None:
    from vit_jax.files import write_atomic

    write_atomic(path, json.dumps({"level": self.level, "tokens": list(self.tokens)}, ensure_ascii=False))

  @classmethod
  def load(cls, path: str) -> Vocab:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
    return cls(tuple(d["tokens"]), d["level"])


# ----------------------------------------------------------------------------------------------------
# An offline English-French corpus in the fra.txt format, from libraries that write real French:
# number words (num2words), dates (babel's CLDR locales, which reorder day and month) and short
# sentences (pyrealb's English and French realisers over the bilingual lexicon below).
# ----------------------------------------------------------------------------------------------------

NOUNS = (  # English, French (pyrealb's lexicons know the gender and the plurals)
    ("cat", "chat"), ("dog", "chien"), ("apple", "pomme"), ("boy", "garçon"), ("girl", "fille"),
    ("book", "livre"), ("car", "voiture"), ("teacher", "professeur"), ("friend", "ami"),
    ("letter", "lettre"), ("child", "enfant"), ("woman", "femme"), ("man", "homme"), ("bird", "oiseau"),
    ("tree", "arbre"), ("door", "porte"), ("window", "fenêtre"))
PLACES = (("garden", "jardin"), ("city", "ville"), ("house", "maison"))
VERBS = (("see", "voir"), ("eat", "manger"), ("find", "trouver"), ("love", "aimer"), ("want", "vouloir"),
         ("buy", "acheter"), ("read", "lire"), ("open", "ouvrir"), ("watch", "regarder"))
ADJECTIVES = (  # English, French, whether the French adjective comes before the noun
    ("big", "grand", True), ("old", "vieux", True), ("small", "petit", True), ("new", "nouveau", True),
    ("beautiful", "beau", True), ("red", "rouge", False), ("green", "vert", False), ("black", "noir", False))
TENSES = (("p", "p"), ("ps", "pc"), ("f", "f"))  # present, past (preterite / passé composé), future


def _sentence_spec(rng: random.Random) -> dict:
  """One random clause: subject, verb, object with an optional adjective, optional place, form."""
  return dict(
      subj=rng.randrange(len(NOUNS)), subj_plural=rng.random() < 0.3, subj_def=rng.random() < 0.7,
      verb=rng.randrange(len(VERBS)), tense=rng.randrange(len(TENSES)),
      obj=rng.randrange(len(NOUNS)), obj_plural=rng.random() < 0.3, obj_def=rng.random() < 0.5,
      adj=rng.randrange(len(ADJECTIVES)) if rng.random() < 0.6 else None,
      place=rng.randrange(len(PLACES)) if rng.random() < 0.35 else None,
      form=rng.choice(("statement", "statement", "negative", "question")))


def _realise(spec: dict, french: bool) -> str:
  import pyrealb as r  # noqa: PLC0415  (optional until a corpus is generated)

  k = 1 if french else 0
  (r.loadFr if french else r.loadEn)()
  articles = ("le", "un") if french else ("the", "a")

  def det(definite):
    return r.D(articles[0 if definite else 1])

  subject = r.NP(det(spec["subj_def"]), r.N(NOUNS[spec["subj"]][k])).n("p" if spec["subj_plural"] else "s")
  obj = [det(spec["obj_def"]), r.N(NOUNS[spec["obj"]][k])]
  if spec["adj"] is not None:
    en, fr, before = ADJECTIVES[spec["adj"]]
    adjective = r.A(fr if french else en)
    obj.insert(1 if (before or not french) else 2, adjective)
  verb_phrase = [r.V(VERBS[spec["verb"]][k]).t(TENSES[spec["tense"]][k]),
                 r.NP(*obj).n("p" if spec["obj_plural"] else "s")]
  if spec["place"] is not None:
    verb_phrase.append(r.PP(r.P("dans" if french else "in"), r.NP(r.D("le" if french else "the"),
                                                                   r.N(PLACES[spec["place"]][k]))))
  clause = r.S(subject, r.VP(*verb_phrase))
  if spec["form"] == "negative":
    clause = clause.typ({"neg": True})
  elif spec["form"] == "question":
    clause = clause.typ({"int": "yon"})
  return " ".join(clause.realize().split())


def _number(rng: random.Random) -> tuple[str, str]:
  from num2words import num2words  # noqa: PLC0415

  n = int(10 ** rng.uniform(0, 6.3)) - 1  # 0 .. ~2M, log-uniform: short and long number words
  return num2words(n, lang="en"), num2words(n, lang="fr")


def _date(rng: random.Random) -> tuple[str, str]:
  import datetime  # noqa: PLC0415

  from babel.dates import format_date  # noqa: PLC0415

  day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(73_000))
  return format_date(day, "full", locale="en"), format_date(day, "full", locale="fr")


def generate_corpus(numbers: int = 3000, dates: int = 3000, sentences: int = 6000, seed: int = 0) -> list[Pair]:
  """English-French pairs, deterministic in `seed`, one translation per (unique) English source."""
  from importlib.metadata import version  # noqa: PLC0415

  rng = random.Random(seed)
  pairs: dict[str, Pair] = {}

  def add(count: int, make, attribution: str):
    target = len(pairs) + count
    for _ in range(count * 20):  # small spaces (dates, short numbers) repeat; stop trying eventually
      if len(pairs) >= target:
        return
      source, french = make()
      if source not in pairs:
        pairs[source] = Pair(source, french, attribution)

  add(numbers, lambda: _number(rng), f"synthetic: num2words {version('num2words')}")
  add(dates, lambda: _date(rng), f"synthetic: babel {version('babel')} dates")

  def sentence():
    spec = _sentence_spec(rng)
    return _realise(spec, french=False), _realise(spec, french=True)

  add(sentences, sentence, f"synthetic: pyrealb {version('pyrealb')}")
  return list(pairs.values())


# ----------------------------------------------------------------------------------------------------
# Training data: a corpus split by source, vocabularies from the training side, fixed-length id arrays.
# ----------------------------------------------------------------------------------------------------

GENERATED = "en_fr_generated"  # config.data.name of the generated corpus; "pairs:/path/fra.txt" for a file


@dataclasses.dataclass(frozen=True)
class TextData:
  """A split corpus ready for training: `source [S]` and `target [T + 1]` (start ... end) id arrays."""
  train: tuple[Pair, ...]
  test: tuple[Pair, ...]
  source_vocab: Vocab
  target_vocab: Vocab
  source_len: int  # S
  target_len: int  # T: decoder steps; target arrays hold T + 1 ids


def _round_up(n: int, multiple: int = 8) -> int:
  return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=8)
def load_text_data(name: str, *, level: str = "char", test_fraction: float = 0.1, split_seed: int = 0,
                   limit: int | None = None, numbers: int = 3000, dates: int = 3000, sentences: int = 6000,
                   corpus_seed: int = 0, plain_spaces: bool = True) -> TextData:
  """`name`: "en_fr_generated" (`generate_corpus(numbers, dates, sentences, corpus_seed)`) or
  "pairs:/path/fra.txt" (the first `limit` pairs).  Vocabularies come from the training split only;
  lengths are the longest pair of either split, rounded up to a multiple of 8."""
  if name == GENERATED:
    pairs = generate_corpus(numbers, dates, sentences, corpus_seed)
  elif name.startswith("pairs:"):
    pairs = read_pairs(name[len("pairs:"):], limit=limit, plain_spaces=plain_spaces)
  else:
    raise ValueError(f"Unknown text dataset {name!r}: use {GENERATED!r} or 'pairs:/path/to/fra.txt'.")
  if limit:
    pairs = pairs[:limit]
  train, test = split_by_source(pairs, test_fraction, split_seed)
  source_vocab = Vocab.build((p.source for p in train), level)
  target_vocab = Vocab.build((p.target for p in train), level)
  everything = train + test
  source_len = _round_up(max(len(source_vocab.split(p.source)) for p in everything))
  target_len = _round_up(max(len(target_vocab.split(p.target)) for p in everything) + 1)
  return TextData(tuple(train), tuple(test), source_vocab, target_vocab, source_len, target_len)


class EncodedPairs:
  """Random access over one split: `{"source": int32 [S], "target": int32 [T + 1]}` per pair."""

  def __init__(self, pairs: Sequence[Pair], data: TextData):
    self.pairs = list(pairs)
    self.source, _ = data.source_vocab.encode_batch([p.source for p in pairs], data.source_len)
    self.target, _ = data.target_vocab.encode_batch([p.target for p in pairs], data.target_len + 1,
                                                    start=True, end=True)

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"source": self.source[i], "target": self.target[i]}


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description="Write an offline English-French corpus in the fra.txt format.")
  parser.add_argument("--out", required=True, help="output file (tab-separated English, French, attribution)")
  parser.add_argument("--numbers", type=int, default=3000)
  parser.add_argument("--dates", type=int, default=3000)
  parser.add_argument("--sentences", type=int, default=6000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  pairs = generate_corpus(args.numbers, args.dates, args.sentences, args.seed)
  write_pairs(args.out, pairs)
  lengths = sorted(len(p.source) for p in pairs)
  print(f"wrote {len(pairs)} pairs to {args.out} (source length median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}, {sum(n >= 60 for n in lengths)} with 60+ characters)")


if __name__ == "__main__":
  main()
