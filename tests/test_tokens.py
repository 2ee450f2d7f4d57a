import json

import numpy as np
import pytest
import torch

from ace.model.tokens import BOS, EOS, PAD, IdentifierVocab, QueryError, QueryTokenizer

QUERIES = [f"a photo of a {c} {a} in the {p}" for c in ("red", "blue", "green", "small", "big")
           for a in ("dog", "cat", "car", "bird") for p in ("park", "street", "house")]


def test_identifier_vocab_levels_are_distinct_tokens():
    vocab = IdentifierVocab([4, 3, 2])
    assert (PAD, BOS, EOS) == (0, 1, 2)
    assert vocab.offsets == [3, 7, 10] and vocab.vocab_size == 12
    codes = np.array([[0, 0, 0], [3, 2, 1]])
    tokens = vocab.encode(codes)
    assert tokens.tolist() == [[3, 7, 10], [6, 9, 11]]
    assert len({int(t) for t in tokens[0]}) == 3            # code 0 at each level: three different tokens
    np.testing.assert_array_equal(vocab.decode(tokens), codes)
    t = vocab.encode(torch.tensor(codes))
    assert isinstance(t, torch.Tensor) and t.tolist() == tokens.tolist()
    assert vocab.decoder_inputs(t).tolist() == [[BOS, 3, 7], [BOS, 6, 9]]


def test_identifier_vocab_errors_and_round_trip(tmp_path):
    vocab = IdentifierVocab([4, 3, 2])
    with pytest.raises(ValueError, match="out of range for level 1"):
        vocab.encode([[0, 3, 0]])
    with pytest.raises(ValueError, match="last dimension 3"):
        vocab.encode([[0, 1]])
    with pytest.raises(ValueError, match="not a level-0 identifier token"):
        vocab.decode([[BOS, 7, 10]])
    with pytest.raises(ValueError, match="positive"):
        IdentifierVocab([4, 0])
    vocab.save(tmp_path / "v.json")
    assert IdentifierVocab.load(tmp_path / "v.json") == vocab
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        IdentifierVocab.load(tmp_path / "bad.json")
    (tmp_path / "v2.json").write_text(json.dumps({"format": 99, "level_sizes": [1]}))
    with pytest.raises(ValueError, match="format 99"):
        IdentifierVocab.load(tmp_path / "v2.json")


def test_sentencepiece_query_tokenizer_caps_vocab_and_round_trips(tmp_path, caplog):
    tok = QueryTokenizer.train(QUERIES, vocab_size=8000, max_length=8)   # far too big for 60 queries
    assert 10 < tok.vocab_size < 8000
    assert "capped" in caplog.text
    ids, mask = tok(["a red dog in the park", "cat"])
    assert ids.shape == mask.shape and ids.dtype == torch.long and ids.shape[0] == 2
    assert mask[1].sum() < mask[0].sum() and (ids[mask == 0] == tok.pad_id).all()
    tok.save(tmp_path)
    again = QueryTokenizer.load(tmp_path)
    ids2, mask2 = again(["a red dog in the park", "cat"])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)


def test_query_tokenizer_errors_and_truncation_policy():
    tok = QueryTokenizer.train(QUERIES, vocab_size=40, max_length=4)
    long = "a photo of a big bird in the street " * 3
    ids, mask = tok([long])
    assert ids.shape[1] == 4 and mask.all()                     # default policy: truncate
    strict = QueryTokenizer.train(QUERIES, vocab_size=40, max_length=4, truncation=False)
    with pytest.raises(QueryError, match="more than max_length=4"):
        strict([long])
    with pytest.raises(QueryError, match="query 1 is empty"):
        tok(["dog", "   "])
    with pytest.raises(QueryError, match="empty list"):
        tok([])
    with pytest.raises(TypeError, match="list of strings"):
        tok("dog")
    with pytest.raises(QueryError, match="empty list of queries"):
        QueryTokenizer.train(["", " "])
    with pytest.raises(FileNotFoundError, match="query_tokenizer.json"):
        QueryTokenizer.load("/nonexistent/folder")


def test_pretrained_query_tokenizer_minilm(tmp_path):
    from ace.data.encoders import minilm_path
    tok = QueryTokenizer.from_pretrained(minilm_path(), max_length=6)
    ids, mask = tok(["a dog running on the beach with a red ball", "cat"])
    assert ids.shape == (2, 6) and mask[0].all() and mask[1].sum() == 3   # [CLS] cat [SEP]
    assert int(ids[0, -1]) == tok.hf.sep_token_id                         # truncation keeps [SEP]
    tok.save(tmp_path)
    assert torch.equal(QueryTokenizer.load(tmp_path)(["cat"])[0], tok(["cat"])[0])
