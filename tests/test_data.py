"""Tokenizer training and the corpus builder: documents, BOS/EOS layout, fill-in-the-middle, the validation split."""
import random

import pytest

from dsv4.cli import BUNDLED
from dsv4.tokenizer import load_tokenizer, train_tokenizer
from dsv4.train.data import build_corpus, fim_transform
from dsv4.train.run import train_end

BEGIN, HOLE, END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


def documents(ids, tok, bos=True):
    """The stream [BOS] doc EOS [BOS] doc EOS ... cut back into documents' ids, asserting that layout."""
    b, e = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert ids and ids[-1] == e
    docs, start = [], 0
    for k in [k for k, i in enumerate(ids) if i == e]:
        doc = ids[start:k]
        if bos:
            assert doc[:1] == [b], "a document does not start with BOS"
            doc = doc[1:]
        assert b not in doc
        docs.append(doc)
        start = k + 1
    return docs


@pytest.mark.parametrize("seed,expected", [
    # Random(3) draws 3, 9: prefix text[:3], middle text[3:9], suffix text[9:]
    (3, [BEGIN, "abc", HOLE, "j", END, "defghi"]),
    # Random(6) draws 9, 1 (in that order): the cut points are 1 and 9 all the same
    (6, [BEGIN, "a", HOLE, "j", END, "bcdefghi"]),
])
def test_fim_transform_is_prefix_suffix_middle(seed, expected):
    """PSM: <fim_begin> prefix <fim_hole> suffix <fim_end> middle, the middle moved to the end."""
    assert fim_transform("abcdefghij", random.Random(seed)) == expected


def test_fim_pieces_are_the_text_cut_at_two_points():
    text = "def f(x):\n    return x + 1\n"
    for seed in range(200):
        out = fim_transform(text, random.Random(seed))
        assert out[0::2] == [BEGIN, HOLE, END]
        prefix, suffix, middle = out[1::2]
        assert prefix + middle + suffix == text
        assert len(prefix) + len(middle) + len(suffix) == len(text)  # no overlap, nothing dropped


def test_each_document_is_bos_text_eos(tmp_path, tok):
    lines = [f"line {i}: {'x' * i}\n" for i in range(12)]
    path = tmp_path / "a.py"
    path.write_text("".join(lines))
    ids = build_corpus([path], tok, tok.token_to_id(EOS), max_chars=40, bos=tok.token_to_id(BOS)).tolist()
    docs = [tok.decode(d) for d in documents(ids, tok)]
    assert len(docs) > 1 and "".join(docs) == "".join(lines)
    # without bos the same documents, EOS-terminated only
    plain = build_corpus([path], tok, tok.token_to_id(EOS), max_chars=40).tolist()
    assert tok.token_to_id(BOS) not in plain
    assert [tok.decode(d) for d in documents(plain, tok, bos=False)] == docs


def test_documents_are_split_at_line_breaks_within_max_chars(tmp_path, tok):
    lines = ["aaaaaaaaa\n", "bbbbbbbbb\n", "ccccccccc\n", "ddd\n", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee\n", "f\n"]
    path = tmp_path / "a.txt"
    path.write_text("".join(lines))
    ids = build_corpus([path], tok, tok.token_to_id(EOS), max_chars=25, bos=tok.token_to_id(BOS)).tolist()
    docs = [tok.decode(d) for d in documents(ids, tok)]
    # 10 + 10 fit, the third line would make 30 > 25; a line longer than max_chars is a document of its own
    assert docs == ["aaaaaaaaa\nbbbbbbbbb\n", "ccccccccc\nddd\n", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee\n", "f\n"]


def test_fim_is_decided_per_document(tmp_path, tok):
    lines = [f"value_{i} = {i} * 2\n" for i in range(40)]
    path = tmp_path / "a.py"
    path.write_text("".join(lines))
    ids = build_corpus([path], tok, tok.token_to_id(EOS), fim_rate=0.5, max_chars=20, bos=tok.token_to_id(BOS),
                       seed=0).tolist()
    docs = documents(ids, tok)
    assert len(docs) == 40
    begin = tok.token_to_id(BEGIN)
    fim = [d[0] == begin for d in docs]
    assert 5 < sum(fim) < 35  # some transformed, some left as they were
    for d, line in zip(docs, lines):
        if d[0] != begin:
            assert tok.decode(d) == line


@pytest.mark.parametrize("n,width,frac,end", [
    (1000, 33, 0.1, 1000 - 3 * 33),  # 30 whole rows, 3 for validation
    (1000, 65, 0.2, 1000 - 3 * 65),  # 15 whole rows, 3 for validation
    (100, 33, 0.5, 100 - 33),        # 3 whole rows, int(1.5) = 1
])
def test_train_end_leaves_whole_rows_for_validation(n, width, frac, end):
    assert train_end(n, width, frac) == end
    assert (n - train_end(n, width, frac)) % width == 0


def test_trained_tokenizer_adds_no_prefix_space(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x = 1\nprint(x)\nhello world\n" * 20)
    tok = train_tokenizer([path], vocab_size=300)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    assert tok.encode("x").tokens == ["x"]  # not "Ġx": a document's first word is not made to follow a space
    for s in ("x", "hello world", "print(x)\n"):
        assert tok.decode(tok.encode(s).ids) == s
