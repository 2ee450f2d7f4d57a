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
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline

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
    from ace.pipeline.stages import read_pairs
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


def test_query_aware_identifiers_leave_out_the_held_out_scorer_queries(tmp_path, minilm_docs):
    """With split.scorer_queries > 0 the hybrid weight is fitted on training queries held out of
    training: the identifiers must not have seen them either (they would leak into the prototypes)."""
    from ace.newitems.query_tower import item_plus_query_vectors
    from ace.pipeline.stages import hold_out_pairs, read_pairs

    enc, docs = minilm_docs
    corpus = _corpus(tmp_path / "corpus.jsonl", docs)
    pipe = _pipeline(tmp_path, corpus, "held", "item_plus_queries")
    pipe.cfg.split.scorer_queries = 10
    pipe.run_all(until="identifiers")
    run = tmp_path / "held"
    pairs = read_pairs(run / "train_queries.json")
    kept, held = hold_out_pairs(pairs, 10, seed=pipe.cfg.seed)
    assert len(held) == 10 and len(kept) == len(pairs) - 10
    ids = json.loads((run / "item_ids.json").read_text())
    saved = np.load(run / "identifier_vectors.npy")
    np.testing.assert_allclose(saved, item_plus_query_vectors(docs, ids, enc.encode([q for q, _ in kept]),
                                                              [iid for _, iid in kept]), atol=1e-5)
    everything = item_plus_query_vectors(docs, ids, enc.encode([q for q, _ in pairs]), [iid for _, iid in pairs])
    assert not np.allclose(saved, everything, atol=1e-3)                            # the held-out ones changed it
    key = pipe.keys["identifiers"]
    pipe2 = _pipeline(tmp_path, corpus, "held", "item_plus_queries")               # scorer_queries=0: a new key
    pipe2.run_all(until="identifiers")
    assert pipe2.keys["identifiers"] != key


def test_query_aware_identifiers_need_a_query_encoder_in_the_item_space(tmp_path):
    from ace.pipeline.stages import PipelineError

    corpus = _corpus(tmp_path / "corpus.jsonl", np.random.default_rng(0).standard_normal((36, 24)))
    pipe = _pipeline(tmp_path, corpus, "bad", "item_plus_queries")
    with pytest.raises(PipelineError, match="384-d vectors but the item embeddings are 24-d"):
        pipe.run_all(until="identifiers")
    with pytest.raises(ValueError, match="vectors must be"):
        _pipeline(tmp_path, corpus, "bad2", "documents")


# ---------------------------------------------------------------- lever 4: identifier-space pretraining

OTHER = ["a {c} {t} outside", "my {c} {t}", "an old {c} {t}", "two {c} {t}s"]


def _karpathy(path: Path, captions: list[list[str]]) -> Path:
    path.write_text(json.dumps([{"image_name": f"im{i}.jpg", "captions": c} for i, c in enumerate(captions)]))
    return path


def test_pretraining_texts_exclude_the_evaluated_file_and_its_captions(tmp_path):
    from ace.pipeline.run_config import PretrainConfig
    from ace.pipeline.stages import PipelineError, pretraining_texts

    own_caps = [[tpl.format(c=c, t=t) for tpl in TEMPLATES] for c in COLOURS for t in THINGS]
    own = _karpathy(tmp_path / "own.json", own_caps)
    # the other file repeats two of the run's captions (case and spacing changed) among its own
    other_caps = [[tpl.format(c=c, t=t) for tpl in OTHER] for c in COLOURS[:3] for t in THINGS]
    other_caps[0] += ["A RED  car", "the car is red "]
    other = _karpathy(tmp_path / "other.json", other_caps)
    exclude = [c for caps in own_caps for c in caps]
    texts = pretraining_texts(PretrainConfig(files=[str(other)]), own, exclude)
    assert len(texts) == 3 * 6 * len(OTHER)
    norm = {" ".join(c.lower().split()) for c in exclude}
    assert not any(" ".join(t.lower().split()) in norm for t in texts)
    assert "a red car outside" in texts
    with pytest.raises(PipelineError, match="evaluated caption file"):
        pretraining_texts(PretrainConfig(files=[str(other), str(own)]), own, exclude)
    assert len(pretraining_texts(PretrainConfig(files=[str(other)], max_texts=10), own, exclude, seed=1)) == 10
    with pytest.raises(PipelineError, match="no caption that is not one of the run's own"):
        pretraining_texts(PretrainConfig(files=[str(own)]), tmp_path / "elsewhere.json", exclude)


def test_pipeline_pretrains_on_identifier_prefixes_of_other_files(tmp_path, minilm_docs):
    from ace.config import from_dict
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline

    _, docs = minilm_docs
    corpus = _corpus(tmp_path / "corpus.jsonl", docs)
    other = _karpathy(tmp_path / "other.json", [[tpl.format(c=c, t=t) for tpl in OTHER] for c in COLOURS for t in THINGS])
    cfg = from_dict(RunConfig, {
        "name": "pre", "run_dir": str(tmp_path / "pre"), "device": "cpu",
        "corpus": {"path": str(corpus)}, "split": {"test_captions": [-1]},
        "encoder": {"image": {"kind": "precomputed"}, "dim": 0},
        "identifiers": {"K": 4, "codebook_size": 4, "M": 2, "max_u": 16, "rqvae_max_steps": 60, "kmeans_n_init": 1},
        "querygen": {"backend": "captions"},
        "model": {"d_model": 32, "n_heads": 2, "encoder_layers": 2, "decoder_layers": 1, "ffn_dim": 64,
                  "query_vocab_size": 80, "prototype_levels": 2},
        "training": {"batch_size": 16, "max_steps": 10, "warmup_steps": 2, "lr": 3e-3, "checkpoint_every": 50,
                     "eval_every": 0, "progress": False, "omega": 0.15},
        "pretrain": {"files": [str(other)], "epochs": 4}})
    pipe = Pipeline(cfg, progress=False)
    pipe.run_all(until="train")
    rec = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert rec["texts"] == 36 * len(OTHER) and rec["steps"] == 4 * (36 * len(OTHER) // 16)
    assert rec["last_loss"] < rec["first_loss"]
    assert (tmp_path / "pre" / "model" / "config.json").is_file()
