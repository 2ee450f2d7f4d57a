"""ace.bench.corpus_union: the caption-proxy union of several files and its nested subsets."""
import json

import numpy as np
import pytest

from ace.bench.baselines import SplitEmbeddings
from ace.bench.corpus_union import UnionError, nested_subset, subset_embeddings, union_split


def caption_file(path, names, n_captions=5):
    path.write_text(json.dumps([{"image_name": n, "captions": [f"{n} caption {c}" for c in range(n_captions)]}
                                for n in names]))
    return path


def test_union_prefixes_ids_and_keeps_the_protocol(tmp_path):
    a = caption_file(tmp_path / "a.json", ["x.jpg", "y.jpg"])
    b = caption_file(tmp_path / "b.json", ["x.jpg", "z.jpg", "short.jpg"])
    (tmp_path / "b.json").write_text(json.dumps(json.loads(b.read_text())[:2] + [
        {"image_name": "short.jpg", "captions": ["only", "three", "captions"]}]))
    u = union_split([a, b])
    assert u.item_ids == ["a:x.jpg", "a:y.jpg", "b:x.jpg", "b:z.jpg"]        # same name in two files: two items
    assert u.documents[2] == "x.jpg caption 0"
    assert len(u.train_queries) == 8 and len(u.test_queries) == 8
    assert ("b:z.jpg", "z.jpg caption 3") in u.test_queries
    with pytest.raises(UnionError, match="no caption files"):
        union_split([])
    with pytest.raises(UnionError, match="share a name"):
        union_split([a, a])


def test_subsets_are_nested_and_embeddings_follow(tmp_path):
    u = union_split([caption_file(tmp_path / "a.json", [f"{i}.jpg" for i in range(30)])])
    small, big = nested_subset(u, 5), nested_subset(u, 20)
    assert len(small) == 5 and set(small.item_ids) <= set(big.item_ids)
    assert {i for i, _ in small.test_queries} == set(small.item_ids) and len(small.test_queries) == 10
    rng = np.random.default_rng(0)
    emb = SplitEmbeddings(rng.normal(size=(30, 4)), rng.normal(size=(60, 4)), rng.normal(size=(60, 4)))
    se = subset_embeddings(u, emb, 5)
    se.check(small)
    rows = [u.item_ids.index(i) for i in small.item_ids]
    assert np.array_equal(se.documents, emb.documents[rows])
    first_test = u.test_queries.index(small.test_queries[0])
    assert np.array_equal(se.test_queries[0], emb.test_queries[first_test])
    with pytest.raises(UnionError, match="subset size"):
        nested_subset(u, 31)


def test_a_subset_written_as_a_caption_file_reads_back_as_the_same_split(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from union_subset_file import main as write_subsets

    from ace.data.importers import load_proxy_split

    a = caption_file(tmp_path / "a.json", [f"x{i}.jpg" for i in range(6)])
    b = caption_file(tmp_path / "b.json", [f"y{i}.jpg" for i in range(5)])
    paths = write_subsets([str(a), str(b), "--sizes", "4", "0", "--out", str(tmp_path / "out")])
    assert [p.name for p in paths] == ["union_4.json", "union_11.json"]
    for n, path in zip((4, 11), paths):
        want = union_split([a, b]) if n == 11 else nested_subset(union_split([a, b]), n, 0)
        got = load_proxy_split(path, "karpathy")
        assert got.item_ids == want.item_ids and got.documents == want.documents
        assert got.train_queries == want.train_queries and got.test_queries == want.test_queries
