"""The fra.txt reader, the split by source and the vocabularies."""

import zipfile

import numpy as np
import pytest

from vit_jax.data import text

FRA = ("Go.\tVa !\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272 (CM) & #1158250 (Wittydev)\n"
       "Go.\tMarche.\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272 (CM) & #8090732 (Micsmithel)\n"
       "Hi.\tSalut\u202f!\tCC-BY 2.0 (France) Attribution: tatoeba.org #538123 (CM) & #509819 (Aiji)\n"
       "\n"
       "I lost.\tJ'ai perdu.\n")


def test_reads_three_and_two_column_lines_plain_and_zipped(tmp_path):
  path = tmp_path / "fra.txt"
  path.write_text(FRA, encoding="utf-8")
  pairs = text.read_pairs(str(path))
  assert [(p.source, p.target) for p in pairs] == [
      ("Go.", "Va !"), ("Go.", "Marche."), ("Hi.", "Salut\u202f!"), ("I lost.", "J'ai perdu.")]
  assert pairs[0].attribution.startswith("CC-BY") and pairs[3].attribution == ""
  assert text.read_pairs(str(path), plain_spaces=True)[2].target == "Salut !"
  assert len(text.read_pairs(str(path), limit=2)) == 2
  archive = tmp_path / "fra-eng.zip"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("fra.txt", FRA)
    z.writestr("_about.txt", "about")
  assert text.read_pairs(str(archive)) == pairs


def test_bad_files_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="fra.txt"):
    text.read_pairs(str(tmp_path / "missing.txt"))
  bad = tmp_path / "bad.txt"
  bad.write_text("Go.\tVa !\nno tab here\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.txt:2: expected 'English<TAB>French"):
    text.read_pairs(str(bad))


def test_write_then_read_round_trips(tmp_path):
  pairs = [text.Pair("one", "un", "synthetic"), text.Pair("Hi.", "Salut !", "")]
  text.write_pairs(str(tmp_path / "new" / "p.txt"), pairs)  # the directory is created
  assert text.read_pairs(str(tmp_path / "new" / "p.txt")) == pairs
  with pytest.raises(ValueError, match="tab or newline"):
    text.write_pairs(str(tmp_path / "q.txt"), [text.Pair("a\tb", "c")])


def test_split_by_source_shares_no_source_and_keeps_all_translations_together():
  pairs = [text.Pair(f"s{i % 40}", f"t{i}") for i in range(200)]
  train, test = text.split_by_source(pairs, 0.25, seed=3)
  assert {p.source for p in train}.isdisjoint({p.source for p in test})
  assert len({p.source for p in test}) == 10 and len(train) + len(test) == 200
  assert all(sum(q.source == p.source for q in test) == 5 for p in test)
  assert text.split_by_source(pairs, 0.25, seed=3) == (train, test)
  assert text.split_by_source(pairs, 0.25, seed=4)[1] != test


def test_char_vocab_markers_padding_and_round_trip(tmp_path):
  vocab = text.Vocab.build(["Va !", "J'ai perdu."], level="char")
  assert vocab.tokens[:4] == ("<pad>", "\t", "\n", "<unk>")
  assert list(vocab.tokens[4:]) == sorted(set("Va !J'ai perdu."))
  ids, lengths = vocab.encode_batch(["Va !", "J'ai"], max_len=8, start=True, end=True)
  assert ids.dtype == np.int32 and lengths.tolist() == [6, 6]
  assert ids[0, 0] == text.START_ID and ids[0, 5] == text.END_ID and (ids[0, 6:] == text.PAD_ID).all()
  assert vocab.decode(ids[0]) == "Va !"
  assert vocab.encode("Vz") == [vocab.index["V"], text.UNK_ID]
  with pytest.raises(ValueError, match="more than max_len=3"):
    vocab.encode_batch(["Va !"], max_len=3)
  vocab.save(str(tmp_path / "v.json"))
  assert text.Vocab.load(str(tmp_path / "v.json")) == vocab


def test_word_vocab_follows_d2l_tokenisation_and_min_freq():
  assert text.word_tokens("Va\u202f! J'ai perdu.") == ["va", "!", "j'ai", "perdu", "."]
  vocab = text.Vocab.build(["Il est calme.", "Il est riche."], level="word", min_freq=2)
  assert vocab.tokens[4:] == (".", "est", "il")
  assert vocab.decode(vocab.encode("Il est calme.", end=True)) == "il est <unk> ."


def test_generated_corpus_is_real_french_deterministic_and_in_the_fra_format(tmp_path):
  pairs = text.generate_corpus(numbers=60, dates=60, sentences=120, seed=5)
  assert len(pairs) == 240 and len({p.source for p in pairs}) == 240
  assert pairs == text.generate_corpus(numbers=60, dates=60, sentences=120, seed=5)
  assert pairs != text.generate_corpus(numbers=60, dates=60, sentences=120, seed=6)
  kinds = {p.attribution.split()[1] for p in pairs}
  assert kinds == {"num2words", "babel", "pyrealb"}
  text.write_pairs(str(tmp_path / "fra.txt"), pairs)
  assert text.read_pairs(str(tmp_path / "fra.txt")) == pairs
  assert max(len(p.source) for p in pairs) >= 60  # long sources exist for the length buckets


def test_generator_parts_write_the_expected_french():
  from babel.dates import format_date
  from num2words import num2words
  import datetime
  assert (num2words(81, lang="fr"), num2words(200, lang="fr"), num2words(201, lang="fr")) == (
      "quatre-vingt-un", "deux cents", "deux cent un")
  day = datetime.date(2021, 7, 14)
  assert (format_date(day, "full", locale="en"), format_date(day, "full", locale="fr")) == (
      "Wednesday, July 14, 2021", "mercredi 14 juillet 2021")
  noun = {en: i for i, (en, _) in enumerate(text.NOUNS)}
  spec = dict(subj=noun["cat"], subj_plural=False, subj_def=True, verb=2, tense=1, obj=noun["apple"],
              obj_plural=False, obj_def=False, adj=1, place=None, form="statement")  # find, past, old
  assert text._realise(spec, french=False) == "The cat found an old apple."
  assert text._realise(spec, french=True) == "Le chat a trouvé une vieille pomme."
  spec.update(subj_plural=True, adj=5, obj_plural=True, form="negative", tense=2, place=0)  # red, garden
  assert text._realise(spec, french=False) == "The cats will not find red apples in the garden."
  assert text._realise(spec, french=True) == "Les chats ne trouveront pas des pommes rouges dans le jardin."
