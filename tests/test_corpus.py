import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ace.data.corpus import Corpus, CorpusError, CorpusItem, corpus_from_captions, load_corpus
from ace.data.importers import CaptionFileError, load_proxy_split


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    for name in ("a.png", "b.wav", "c.mp4", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def good_rows() -> list[dict]:
    return [
        {"item_id": "a", "modality": "image", "media": "a.png", "captions": ["a red ball", "a ball"], "metadata": {"k": 1}},
        {"item_id": "b", "modality": "audio", "media": "b.wav", "captions": ["a dog barks"]},
        {"item_id": "c", "modality": "video", "media": "c.mp4"},
        {"item_id": "d", "modality": "text", "media": "d.txt"},
        {"item_id": "e", "modality": "image", "embedding": [0.5, 0.25, 1.0]},
        {"item_id": "f", "modality": "text", "captions": ["just a description"], "metadata": {"text": "body"}},
    ]


def test_jsonl_mixed_modalities_and_round_trip(media):
    corpus = load_corpus(write_jsonl(media / "corpus.jsonl", good_rows()))
    assert len(corpus) == 6 and corpus.item_ids == list("abcdef")
    assert corpus.by_modality() == {"image": [0, 4], "audio": [1], "video": [2], "text": [3, 5]}
    assert corpus.media_path(corpus.get("a")) == (media / "a.png").resolve()
    assert corpus.get("a").metadata == {"k": 1} and corpus.get("c").metadata == {}
    np.testing.assert_array_equal(corpus.get("e").embedding, np.array([0.5, 0.25, 1.0], np.float32))
    assert corpus.get("f").description() == "body" and corpus.get("b").description() == "a dog barks"
    again = load_corpus(corpus.save_jsonl(media / "copy.jsonl"))
    assert [it.to_dict() for it in again] == [it.to_dict() for it in corpus]
    assert corpus.subset(["e", "a"]).item_ids == ["e", "a"]
    with pytest.raises(KeyError, match="unknown item id 'zz'"):
        corpus.get("zz")


def test_csv_and_parquet(media):
    with open(media / "corpus.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "modality", "media", "caption_1", "caption_2", "embedding", "extra"])
        w.writerow(["a", "image", "a.png", "one", "two", "", "x"])
        w.writerow(["b", "audio", "", "three", "", "[1.0, 2.0]", "y"])
    corpus = load_corpus(media / "corpus.csv")
    assert corpus.get("a").captions == ["one", "two"] and corpus.get("a").metadata == {"extra": "x"}
    assert corpus.get("b").media is None and corpus.get("b").embedding.tolist() == [1.0, 2.0]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"item_id": ["a", "b"], "modality": ["image", "audio"], "media": ["a.png", "b.wav"],
                      "captions": [["x y"], ["z"]]})
    pq.write_table(table, media / "corpus.parquet")
    assert load_corpus(media / "corpus.parquet").get("b").captions == ["z"]


BAD_CASES = {
    "missing media": (dict(item_id="m", modality="image", media="nope.png"), r"missing media files .*row 6 \(item_id 'm', .*nope\.png"),
    "duplicate id": (dict(item_id="a", modality="image", media="a.png"), r"duplicate item ids .*row 6 \(item_id 'a', first at row 0\)"),
    "empty caption": (dict(item_id="m", modality="image", media="a.png", captions=["ok", "  "]), r"empty captions .*row 6 \(item_id 'm'\)"),
    "unknown modality": (dict(item_id="m", modality="smell", media="a.png"), r"unknown modality .*row 6 \(item_id 'm', modality 'smell'\)"),
    "mixed dims": (dict(item_id="m", modality="image", embedding=[1.0, 2.0]), r"mixed embedding dimensions \[2, 3\] .*row 6 \(item_id 'm', dim 2\)"),
    "nan embedding": (dict(item_id="m", modality="image", embedding=[1.0, float("nan"), 0.0]), r"NaN or infinite embedding values .*row 6 \(item_id 'm'\)"),
    "nothing to encode": (dict(item_id="m", modality="audio"), r"no media, no embedding .*row 6 \(item_id 'm'\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_are_named(media, case):
    row, pattern = BAD_CASES[case]
    with pytest.raises(CorpusError, match=pattern):
        load_corpus(write_jsonl(media / "bad.jsonl", good_rows() + [row]))


def test_all_problems_reported_together(media):
    rows = good_rows() + [dict(item_id="a", modality="smell", media="gone.png")]
    with pytest.raises(CorpusError) as err:
        load_corpus(write_jsonl(media / "bad.jsonl", rows))
    msg = str(err.value)
    assert "duplicate item ids" in msg and "unknown modality" in msg and "missing media files" in msg


def test_empty_and_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match="empty corpus"):
        load_corpus(tmp_path / "empty.jsonl")
    with pytest.raises(CorpusError, match="empty corpus"):
        Corpus([]).validate()
    (tmp_path / "broken.jsonl").write_text('{"item_id": "a", "modality": \n')
    with pytest.raises(CorpusError, match="cannot read corpus"):
        load_corpus(tmp_path / "broken.jsonl")
    write_jsonl(tmp_path / "nocol.jsonl", [{"id": "a", "modality": "image"}])
    with pytest.raises(CorpusError, match="lacks column.*item_id"):
        load_corpus(tmp_path / "nocol.jsonl")
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "absent.jsonl")


def test_check_media_can_be_skipped(media):
    rows = [dict(item_id="m", modality="image", media="nope.png")]
    corpus = load_corpus(write_jsonl(media / "c.jsonl", rows), check_media=False)
    assert corpus.item_ids == ["m"]


def write_clotho(path: Path, n: int = 3, captions: int = 5) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for k in range(n):
            w.writerow([f"clip{k}.wav"] + [f"clip {k} caption {i}" if i <= captions else "" for i in range(1, 6)])
    return path


def test_corpus_from_captions_and_proxy_split(tmp_path):
    path = write_clotho(tmp_path / "clotho_captions_x.csv")
    corpus = corpus_from_captions(path)
    assert corpus.item_ids == ["clip0.wav", "clip1.wav", "clip2.wav"] and corpus.modalities == ["audio"] * 3
    assert corpus.get("clip1.wav").captions[0] == "clip 1 caption 1" and corpus.get("clip1.wav").media == "clip1.wav"
    split = corpus.proxy_split()
    ref = load_proxy_split(path)
    assert split.item_ids == ref.item_ids and split.documents == ref.documents
    assert split.test_queries == ref.test_queries and split.train_queries == ref.train_queries
    # load_corpus recognises a caption file (no item_id column) and hands it to the importers
    assert load_corpus(path).item_ids == corpus.item_ids
    for k in range(3):
        (tmp_path / f"clip{k}.wav").write_bytes(b"x")
    assert len(corpus_from_captions(path, media_root=tmp_path, check_media=True)) == 3
    (tmp_path / "clip2.wav").unlink()
    with pytest.raises(CorpusError, match=r"missing media files .*row 2 \(item_id 'clip2.wav'"):
        corpus_from_captions(path, media_root=tmp_path, check_media=True)


def test_proxy_split_needs_five_captions(tmp_path):
    corpus = corpus_from_captions(write_clotho(tmp_path / "clotho_captions_x.csv", captions=3))
    with pytest.raises(CaptionFileError, match="has 5 captions"):
        corpus.proxy_split()
    assert len(corpus.proxy_split(min_captions=3)) == 3


def test_real_caption_file(shared_data):
    corpus = corpus_from_captions(shared_data / "flickr30k" / "flickr30k_val.json")
    assert len(corpus) == 1014 and set(corpus.modalities) == {"image"}
    assert len(corpus.proxy_split().test_queries) == 2 * 1014


def test_in_memory_corpus_validation():
    items = [CorpusItem("x", "image", embedding=np.ones(4, np.float32)), CorpusItem("y", "image", embedding=np.ones(4))]
    assert Corpus(items).validate() is not None
    items.append(CorpusItem("z", "image", embedding=np.ones((2, 2))))
    with pytest.raises(CorpusError, match=r"not a non-empty 1-D vector .*row 2"):
        Corpus(items).validate()
