import json

import pytest

from ace.data.importers import CaptionFileError, caption_proxy_split, load_proxy_split, read_captions

FILES = {
    "flickr30k/flickr30k_val.json": (1014, "image"),
    "mscoco/mscoco_val.json": (5000, "image"),
    "clotho/clotho_captions_development.csv": (2893, "audio"),
    "audiocaps/val.csv": (495, "audio"),
    "msvd/MSVD_val.tsv": (100, "video"),
}


@pytest.mark.parametrize("rel", sorted(FILES))
def test_real_caption_files_follow_protocol(shared_data, rel):
    n, modality = FILES[rel]
    split = load_proxy_split(shared_data / rel)
    assert len(split) == n and set(split.modalities) == {modality}
    assert len(split.train_queries) == 2 * n and len(split.test_queries) == 2 * n
    # the document, training and test captions of an item are disjoint positions 1 | 2-3 | 4-5
    items = {it.item_id: it for it in read_captions(shared_data / rel)}
    first = split.item_ids[0]
    assert split.documents[0] == items[first].captions[0]
    assert [q for i, q in split.test_queries[:2]] == items[first].captions[3:5]


def test_didemo_quoted_multiline_rows(shared_data):
    items = read_captions(shared_data / "didemo/DiDeMo_val.tsv")
    assert all(it.item_id.endswith(".mp4") for it in items)
    assert all("\n" not in c for it in items for c in it.captions)


def test_flickr8k_split_list(shared_data):
    d = shared_data / "flickr8k"
    items = read_captions(d / "Flickr8k.token.txt", split_list=d / "Flickr_8k.testImages.txt")
    assert len(items) == 1000 and all(len(it.captions) == 5 for it in items)


def test_bad_files(tmp_path):
    with pytest.raises(CaptionFileError, match="not found"):
        read_captions(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CaptionFileError, match="malformed"):
        read_captions(bad)
    odd = tmp_path / "x.bin"
    odd.write_text("?")
    with pytest.raises(CaptionFileError, match="format"):
        read_captions(odd)
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"image_name": "a.jpg", "captions": ["one", "two"]}]))
    with pytest.raises(CaptionFileError, match="5 captions"):
        load_proxy_split(short)


def test_duplicate_item_ids_rejected(tmp_path):
    f = tmp_path / "dup.json"
    f.write_text(json.dumps([{"image_name": "a.jpg", "captions": list("abcde")}] * 2))
    with pytest.raises(CaptionFileError, match="duplicate item id 'a.jpg'"):
        caption_proxy_split(read_captions(f))
