"""Issue 19 levers on tiny data: query-aware identifiers (lever 1) in the pipeline."""
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline import COLOURS, TEMPLATES, THINGS


def _corpus(path: Path, embeddings: np.ndarray) -> Path:
    rows, i = [], 0
    for c in COLOURS:
        for t in THINGS:
            rows.append({"item_id": f"{c}-{t}", "modality": "image", "embedding": embeddings[i].tolist(),
                         "captions": [tpl.format(c=c, t=t) for tpl in TEMPLATES]})
            i += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pipeline(tmp_path: Path, corpus: Path, name: str, vectors: str):
    from ace.config import from_dict
    from ace.pipeline import Pipeline, RunConfig

    cfg = from_dict(RunConfig, {
        "name": name, "run_dir": str(tmp_path / name), "device": "cpu",
        "corpus": {"path": str(corpus)}, "split": {"test_captions": [-1]},
        "encoder": {"image": {"kind": "precomputed"}, "dim": 0},
        "identifiers": {"K": 4, "codebook_size": 4, "M": 2, "max_u": 16, "rqvae_max_steps": 60,
                        "kmeans_n_init": 1, "vectors": vectors},
        "querygen": {"backend": "captions"}})
    return Pipeline(cfg, progress=False)


@pytest.fixture(scope="module")
def minilm_docs():
    from ace.data.encoders import TextEncoder

    enc = TextEncoder("minilm", device="cpu")
    return enc, enc.encode([TEMPLATES[0].format(c=c, t=t) for c in COLOURS for t in THINGS])


def test_query_aware_identifiers_differ_from_document_only_and_are_unique(tmp_path, minilm_docs):
    from ace.newitems.query_tower import item_plus_query_vectors
    from ace.pipeline import read_pairs
    from identifiers import SemanticIdTokenizer

    enc, docs = minilm_docs
    corpus = _corpus(tmp_path / "corpus.jsonl", docs)
    toks = {}
    for vectors in ("item", "item_plus_queries"):
        pipe = _pipeline(tmp_path, corpus, vectors, vectors)
        pipe.run_all(until="identifiers")
        toks[vectors] = SemanticIdTokenizer.load(pipe.run / "identifiers", device="cpu")
        codes = toks[vectors].codes
        assert len({tuple(r) for r in codes.tolist()}) == len(codes) == 36       # unique identifiers
    assert not (tmp_path / "item" / "identifier_vectors.npy").exists()
    run = tmp_path / "item_plus_queries"
    # what was quantised: the normalised mean of the document and its training queries, by hand
    saved = np.load(run / "identifier_vectors.npy")
    pairs = read_pairs(run / "train_queries.json")
    ids = json.loads((run / "item_ids.json").read_text())
    i = ids.index("red-car")
    mine = [q for q, iid in pairs if iid == "red-car"]
    assert len(mine) == len(TEMPLATES) - 1                                         # the held-out caption is not used
    by_hand = docs[i] + enc.encode(mine).sum(0)
    np.testing.assert_allclose(saved[i], by_hand / np.linalg.norm(by_hand), atol=1e-5)
    np.testing.assert_allclose(saved, item_plus_query_vectors(docs, ids, enc.encode([q for q, _ in pairs]),
                                                              [iid for _, iid in pairs]), atol=1e-5)
    a, b = toks["item"], toks["item_plus_queries"]
    assert a.item_ids == b.item_ids and not np.array_equal(a.codes, b.codes)
    # the item-only run keeps the key it had before the switch existed
    from ace.config import config_hash, to_dict
    pipe = _pipeline(tmp_path, corpus, "item", "item")
    pipe.run_all(until="identifiers")
    old = {k: v for k, v in to_dict(pipe.cfg.identifiers).items() if k not in ("vectors", "query_encoder")}
    assert pipe.keys["identifiers"] == config_hash(pipe.keys["encode"], old)


def test_query_aware_identifiers_need_a_query_encoder_in_the_item_space(tmp_path):
    from ace.pipeline import PipelineError

    corpus = _corpus(tmp_path / "corpus.jsonl", np.random.default_rng(0).standard_normal((36, 24)))
    pipe = _pipeline(tmp_path, corpus, "bad", "item_plus_queries")
    with pytest.raises(PipelineError, match="384-d vectors but the item embeddings are 24-d"):
        pipe.run_all(until="identifiers")
    with pytest.raises(ValueError, match="vectors must be"):
        _pipeline(tmp_path, corpus, "bad2", "documents")
