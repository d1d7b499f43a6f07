"""Vocabulary (SCAN JSON layout) and the download-free NLTK tokenizer."""
from __future__ import annotations

import json
import random

import nltk
import pytest
from nltk.tokenize import word_tokenize

from hsc_pyg.cli.vocab import main
from hsc_pyg.data.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, build_vocab, tokenize
from hsc_pyg.errors import ConfigError, VocabError

TRICKY = [
    ("A man's dog doesn't run.", ["a", "man", "'s", "dog", "does", "n't", "run", "."]),
    ("Two dogs, 2 cats; 3.5 kg!", ["two", "dogs", ",", "2", "cats", ";", "3.5", "kg", "!"]),
    ("Café in São Paulo", ["café", "in", "são", "paulo"]),
    ('He said "hi".', ["he", "said", "``", "hi", "''", "."]),
    ('A " ADHD " sign .', ["a", "``", "adhd", "``", "sign", "."]),  # spaced quotes both read as opening (NLTK)
    ("A man rock-climbing", ["a", "man", "rock-climbing"]),
    ("  Extra   spaces\tand a tab ", ["extra", "spaces", "and", "a", "tab"]),
    ("The kids' toys (red) cost $5", ["the", "kids", "'", "toys", "(", "red", ")", "cost", "$", "5"]),
]


@pytest.mark.parametrize("text, expected", TRICKY)
def test_tokenize_tricky_captions(text, expected):
    assert tokenize(text) == expected


@pytest.mark.parametrize("text", [t for t, _ in TRICKY] + ["ok. Then he left.", "Mr. Smith runs ."])
def test_tokenize_is_word_tokenize_without_sentence_split(text):
    assert tokenize(text) == word_tokenize(text.lower(), preserve_line=True)


def test_tokenize_needs_no_nltk_data(monkeypatch):
    def no_data(*args, **kwargs):
        raise LookupError("no NLTK data in this test")

    monkeypatch.setattr(nltk.data, "find", no_data)
    monkeypatch.setattr(nltk.data, "load", no_data)
    # the documented difference from nltk.word_tokenize: an inner period stays on its word
    assert tokenize("It is ok. Then a dog .") == ["it", "is", "ok.", "then", "a", "dog", "."]


def test_specials_have_scan_ids():
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    v = Vocabulary()
    assert [v.idx2word[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"] == list(SPECIALS)
    assert len(v) == v.idx == 4


def test_encode_decode_and_unknown_words():
    v = Vocabulary(["a", "red", "cube", "."])
    assert v.word2idx == {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "red": 5, "cube": 6, ".": 7}
    assert v.encode("A red cube .") == [1, 4, 5, 6, 7, 2]
    assert v.encode("a Blue cube") == [1, 4, 3, 6, 2]
    assert v.encode("zzz qqq") == [START, UNK, UNK, END]  # all unknown is still a valid caption
    assert v.decode([1, 4, 5, 6, 2]) == ["<start>", "a", "red", "cube", "<end>"]
    assert v("red") == 5 and v("blue") == UNK
    assert "cube" in v and "blue" not in v


def test_decode_unknown_id_message():
    with pytest.raises(VocabError, match=r"^token id 9 is outside the vocabulary \(ids 0\.\.4\); "):
        Vocabulary(["a"]).decode([1, 9])


def test_build_vocab_threshold_and_deterministic_order():
    captions = ["a red cube", "a blue ball", "a red ball", "the red cone", "a cone"]
    v = build_vocab(captions, threshold=2)
    # counts: a 4, red 3, ball 2, cone 2; blue, cube, the 1 -> dropped; ties alphabetical
    assert [v.idx2word[i] for i in range(len(v))] == list(SPECIALS) + ["a", "red", "ball", "cone"]
    shuffled = captions[:]
    random.Random(1).shuffle(shuffled)
    assert build_vocab(shuffled, threshold=2).word2idx == v.word2idx
    assert len(build_vocab(captions, threshold=1)) == 4 + 7


def test_build_vocab_errors():
    with pytest.raises(ConfigError, match=r"^vocabulary threshold must be a positive integer, found 0; "):
        build_vocab(["a"], threshold=0)
    with pytest.raises(VocabError, match=r"^cannot build a vocabulary from no captions; "):
        build_vocab([])
    with pytest.raises(VocabError, match=r"^no word occurs 4 times or more in the 2 captions \(most frequent: 2 "
                                         r"times\); lower --threshold$"):
        build_vocab(["a dog", "a cat"], threshold=4)


def test_save_load_round_trip_scan_layout(tmp_path):
    v = build_vocab(["a red cube", "a red ball", "a cube"], threshold=1)
    path = tmp_path / "sub" / "vocab.json"
    v.save(path)
    raw = json.loads(path.read_text())
    assert set(raw) == {"word2idx", "idx2word", "idx"}
    assert raw["idx"] == 8 and raw["idx2word"]["4"] == "a" and raw["word2idx"]["a"] == 4
    loaded = Vocabulary.load(path)
    assert loaded.word2idx == v.word2idx and loaded.idx2word == v.idx2word and loaded.idx == 8
    assert Vocabulary.from_dict(v.to_dict()).word2idx == v.word2idx


@pytest.mark.parametrize("name, size", [("f30k", 8481), ("coco", 11353)])
def test_official_vocabularies_load_unchanged(shared_dir, name, size):
    path = shared_dir / "data" / "scan_text" / f"{name}_precomp_vocab.json"
    v = Vocabulary.load(path)
    assert len(v) == size
    assert v.to_dict() == json.loads(path.read_text())
    assert v("<unk>") == 3 and v.idx2word[3] == "<unk>"


@pytest.mark.parametrize("name, tokens, oov", [("f30k", 67443, 657), ("coco", 56292, 231)])
def test_out_of_vocabulary_rate_on_real_test_captions(shared_dir, name, tokens, oov):
    text_dir = shared_dir / "data" / "scan_text"
    v = Vocabulary.load(text_dir / f"{name}_precomp_vocab.json")
    captions = [c for c in (text_dir / f"{name}_test_caps.txt").read_text(encoding="utf-8").split("\n") if c]
    assert len(captions) == 5000
    words = [w for c in captions for w in tokenize(c)]
    unknown = sum(w not in v for w in words)
    # measured: f30k 657 / 67,443 tokens = 0.97%, coco 231 / 56,292 = 0.41%
    assert (len(words), unknown) == (tokens, oov)
    assert unknown / len(words) < 0.015


def _write(tmp_path, text, name="v.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = Vocabulary(["a", "dog"]).to_dict()


@pytest.mark.parametrize("content, message", [
    ("", r"^vocabulary file \S+v\.json is empty; build one with `hsc-pyg vocab "),
    ("{bad json", r"^vocabulary file \S+v\.json is not valid JSON \(Expecting property name enclosed in double quotes "
                  r"at line 1 column 2\); "),
    ("[1, 2]", r"^vocabulary file \S+v\.json: expected a JSON object with keys word2idx, idx2word, idx; found list; "),
    (json.dumps({"word2idx": GOOD["word2idx"]}),
     r"^vocabulary file \S+v\.json: missing key\(s\) idx2word, idx; expected the SCAN layout "),
    (json.dumps({"word2idx": {}, "idx2word": {}, "idx": 0}),
     r"^vocabulary file \S+v\.json: the vocabulary is empty \(word2idx has no entries\); "),
    (json.dumps({"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3},
                 "idx2word": {"0": "<start>", "1": "<pad>", "2": "<end>", "3": "<unk>"}, "idx": 4}),
     r"^vocabulary file \S+v\.json: special <pad> must have id 0, found 1 \(expected <pad>=0 <start>=1 <end>=2 "
     r"<unk>=3\); "),
    (json.dumps(dict(GOOD, idx=7)), r"^vocabulary file \S+v\.json: idx is 7 but word2idx has 6 entries; "),
    (json.dumps(dict(GOOD, idx2word=dict(GOOD["idx2word"], **{"5": "cat"}))),
     r"^vocabulary file \S+v\.json: idx2word is not the inverse of word2idx; "),
    (json.dumps(dict(GOOD, word2idx=dict(GOOD["word2idx"], dog=9))),
     r"^vocabulary file \S+v\.json: word2idx ids must be the integers 0\.\.5, each once; "),
])
def test_load_errors_are_one_line(tmp_path, content, message):
    with pytest.raises(VocabError, match=message) as info:
        Vocabulary.load(_write(tmp_path, content))
    assert "\n" not in str(info.value)


def test_load_missing_file_message(tmp_path):
    with pytest.raises(VocabError, match=r"^vocabulary file \S+nope\.json does not exist; build one with "
                                         r"`hsc-pyg vocab --data_path DIR --data_name NAME "):
        Vocabulary.load(tmp_path / "nope.json")


def _caption_folder(tmp_path, lines):
    folder = tmp_path / "toy_precomp"
    folder.mkdir()
    (folder / "train_caps.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_command_builds_and_refuses_to_overwrite(tmp_path, capsys):
    root = _caption_folder(tmp_path, ["a red cube", "a red ball"] * 2)
    out = tmp_path / "vocab.json"
    argv = ["--data_path", str(root), "--data_name", "toy_precomp", "--threshold", "2", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote {out}: 8 entries (4 words seen >= 2 times in 4 train captions)\n"
    assert Vocabulary.load(out).word2idx == {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3,
                                             "a": 4, "red": 5, "ball": 6, "cube": 7}
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {out} already exists; pass --overwrite to replace it or choose another --out\n"
    assert main(argv[:-2] + ["--threshold", "1", "--out", str(out), "--overwrite"]) == 0


def test_command_missing_dataset_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--data_path", str(tmp_path), "--data_name", "f30k_precomp", "--out", str(tmp_path / "v.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: dataset folder {tmp_path / 'f30k_precomp'} does not exist ({tmp_path} holds: "
                          "no folders); get the SCAN precomp features")
    assert err.count("\n") == 1


def test_command_help_explains(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "train_caps.txt" in text and "--threshold" in text and "--overwrite" in text

