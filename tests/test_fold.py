"""train.py fold on a tiny trained run: added items move from the fallback to the generative path."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ace.data.corpus import CorpusItem
from ace.pipeline.fold import Fold, FoldConfig, fold_run
from ace.serving.retriever import Retriever
from ace.serving.store import ItemStore
from tests.test_pipeline import TEMPLATES, make_corpus

NEW = ["white-car", "blue-tree", "black-dog", "green-boat", "yellow-chair", "red-house"]  # added after training
FOLD = ["steps=80", "batch_size=32", "lr=3e-3", "warmup_steps=10", "min_replay=100", "checkpoint_every=40",
        "num_beams=5", "top_k=5", "eval_batch_size=50", "progress=false", "device=cpu", "gate=false"]


def _captions(item_id: str) -> list[str]:
    c, t = item_id.split("-")
    return [tpl.format(c=c, t=t) for tpl in TEMPLATES]


def _config(base: Path) -> Path:
    rows = [json.loads(line) for line in make_corpus(base / "all.jsonl").read_text().splitlines()]
    (base / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["item_id"] not in NEW))
    (base / "new.json").write_text(json.dumps([r for r in rows if r["item_id"] in NEW]))
    cfg = f"""
name: tinyfold
run_dir: {base / 'run'}
device: cpu
corpus: {{path: {base / 'corpus.jsonl'}}}
split: {{test_captions: [-1]}}
encoder: {{image: {{kind: precomputed}}, dim: 0}}
identifiers: {{K: 4, codebook_size: 4, M: 2, max_u: 16, rqvae_max_steps: 60, kmeans_n_init: 1}}
querygen: {{backend: captions}}
model: {{d_model: 32, n_heads: 2, encoder_layers: 2, decoder_layers: 1, ffn_dim: 64, query_vocab_size: 60}}
training: {{batch_size: 30, max_steps: 150, warmup_steps: 10, lr: 3.0e-3, checkpoint_every: 150, eval_every: 0, num_beams: 5, eval_top_k: 5, progress: false}}
fallback: {{calibration_queries: 40, tower: {{epochs: 10, batch_size: 32, device: cpu}}, hash: {{bits: 64, steps: 50, device: cpu}}}}
eval: {{num_beams: [5], top_k: 5}}
"""
    path = base / "tinyfold.yaml"
    path.write_text(cfg)
    return path


def _add_new_items(base: Path, run: Path) -> list[dict]:
    """Add the NEW items through the Retriever (all captions but the last, which is held out)."""
    new = json.loads((base / "new.json").read_text())
    retriever = Retriever.from_run(run, device="cpu")
    retriever.add_items([CorpusItem(r["item_id"], "image", captions=r["captions"][:-1],
                                    embedding=np.asarray(r["embedding"], np.float32) / np.linalg.norm(r["embedding"]))
                         for r in new])
    retriever.close()
    return new


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A trained tiny run (30 items) with its fallback stage, and 6 more items added through the Retriever."""
    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline

    base = tmp_path_factory.mktemp("fold")
    Pipeline(load_config(RunConfig, _config(base)), progress=False).run_all(until="fallback")
    run = base / "run"
    new = _add_new_items(base, run)
    (run / "added_test_queries.json").write_text(json.dumps([[r["captions"][-1], r["item_id"]] for r in new]))
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the base run (each test folds its own)."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _fold(run: Path, *extra: str):
    from ace.config import load_config

    return fold_run(run, load_config(FoldConfig, None, FOLD + list(extra)))


def _identifiers(run: Path) -> dict[str, tuple[int, ...]]:
    r = Retriever.from_run(run, device="cpu")
    try:
        return {i: tuple(int(c) for c in row) for i, row in zip(r.id_tokenizer.item_ids, r.id_tokenizer.codes)}
    finally:
        r.close()


def _model_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "model").iterdir())}


def test_fold_moves_added_items_to_the_generative_path(run):
    before_ids = _identifiers(run)
    old_model = _model_bytes(run)
    result = _fold(run)
    assert sorted(result.folded) == sorted(NEW)
    with ItemStore(run / "store.sqlite") as store:
        assert {it.item_id for it in store.list_active(source="folded")} == set(NEW)
        assert store.count(source="added") == 0
    assert _identifiers(run) == before_ids  # old and folded items keep their identifiers
    assert _model_bytes(run) != old_model
    assert {p.name: p.read_bytes() for p in sorted((run / "model.prev").iterdir())} == old_model

    r = Retriever.from_run(run, device="cpu")
    try:
        assert len(r.fallback) == 0 and not any(i in r.fallback for i in NEW)
        queries = [_captions(i)[0] for i in NEW]
        hits = r.search_generative(queries, k=5, num_beams=5)
        found = [i for i, row in zip(NEW, hits) if i in [h.item_id for h in row]]
        assert len(found) >= 4, f"folded items found by their training queries: {found}"
        merged = r.search(queries, k=5, num_beams=5)
        assert all(h.source == "generative" for row in merged for h in row)
    finally:
        r.close()

    metrics = json.loads((result.fold_dir / "metrics.json").read_text())
    assert metrics["items"] == len(NEW) and metrics["steps"] == 80
    assert metrics["before"]["new_fallback"]["queries"] == len(NEW)
    assert metrics["after"]["new_generative"]["queries"] == len(NEW)
    assert metrics["after"]["old_generative"]["queries"] > 0
    assert "| folded items: fallback before, generative after |" in (result.fold_dir / "report.md").read_text()


def test_deleted_items_stay_deleted_and_second_fold_does_nothing(run):
    r = Retriever.from_run(run, device="cpu")
    r.delete_items(["red-car", NEW[0]])  # one trained, one added
    r.close()
    result = _fold(run, "steps=20")
    assert sorted(result.folded) == sorted(NEW[1:])
    with ItemStore(run / "store.sqlite") as store:
        assert store.status("red-car") == "deleted" and store.status(NEW[0]) == "deleted"
    r = Retriever.from_run(run, device="cpu")
    try:
        assert "red-car" not in r.id_tokenizer.trie and NEW[0] not in r.id_tokenizer.trie
        hits = r.search(["a red car", "a white car", "photo of a white car"], k=10, num_beams=10)
        assert not {h.item_id for row in hits for h in row} & {"red-car", NEW[0]}
    finally:
        r.close()

    model = _model_bytes(run)
    folds = sorted(p.name for p in (run / "fold").iterdir())
    again = _fold(run)
    assert again.fold_dir is None and again.folded == [] and "nothing to fold" in again.message
    assert _model_bytes(run) == model and sorted(p.name for p in (run / "fold").iterdir()) == folds


def test_crash_before_the_swap_keeps_the_old_model_then_the_next_fold_finishes(run, monkeypatch):
    old_model = _model_bytes(run)
    ids = _identifiers(run)

    def crash(self, fold_dir):
        raise RuntimeError("injected crash before the rename")

    monkeypatch.setattr(Fold, "_swap_in", crash)
    with pytest.raises(RuntimeError, match="injected"):
        _fold(run, "steps=20")
    assert _model_bytes(run) == old_model and not (run / "model.prev").exists()
    r = Retriever.from_run(run, device="cpu")  # still usable: old model, items still in the fallback
    try:
        assert set(r.fallback.item_ids) == set(NEW)
        assert r.search_fallback(["a white car"], k=3)[0][0].source == "fallback"
    finally:
        r.close()
    with ItemStore(run / "store.sqlite") as store:
        assert store.count(source="added") == len(NEW)
    assert _identifiers(run) == ids
    staged = _model_bytes(run / "fold" / "1")
    assert json.loads((run / "fold" / "1" / "state.json").read_text())["phase"] == "swapping"

    monkeypatch.undo()
    result = _fold(run, "steps=20")  # rolls the staged fold forward (no retraining)
    assert sorted(result.folded) == sorted(NEW) and result.fold_dir.name == "1"
    assert _model_bytes(run) == staged != old_model and _identifiers(run) == ids
    with ItemStore(run / "store.sqlite") as store:
        assert store.count(source="folded") == len(NEW)


def test_bad_input_gives_clear_errors(run, tmp_path, capsys):
    import train

    assert train.main(["fold", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "steps=0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "gate_k=3"]) == 2
    assert "gate's cut-off" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "replay=everything"]) == 2
    assert "replay must be 'structured' or 'random'" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "old_bar=everyone"]) == 2
    assert "old_bar must be 'auto', 'unshared' or 'served'" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "old_bar=served"]) == 2   # not a hybrid run: refused up front
    assert "needs a hybrid run" in capsys.readouterr().err and not (run / "fold").exists()
    assert train.main(["fold", "--run", str(run), "max_old_drop=-1"]) == 2
    assert "max_old_drop must be >= 0" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), "val_per_item=0"]) == 2
    assert "gate=true needs val_per_item >= 1" in capsys.readouterr().err
    assert train.main(["fold", "--run", str(run), f"test_queries={tmp_path / 'missing.json'}"]) == 2
    assert "test_queries file not found" in capsys.readouterr().err
    shutil.rmtree(run / "model")
    assert train.main(["fold", "--run", str(run)]) == 2
    assert "missing model" in capsys.readouterr().err
    assert not (run / "fold").exists()


def test_nothing_to_fold_exits_zero(base_run, tmp_path, capsys):
    run = Path(shutil.copytree(base_run, tmp_path / "run", ignore=shutil.ignore_patterns("store.sqlite*")))
    import train

    assert train.main(["fold", "--run", str(run), "--quiet"]) == 0
    assert "nothing to fold" in capsys.readouterr().out


def test_crash_between_the_renames_is_rolled_forward(run, monkeypatch):
    old_model = _model_bytes(run)

    def crash(self, fold_dir):  # the old model moved aside, the staged one not yet in place
        (self.run / "model").rename(self.run / "model.prev")
        raise RuntimeError("injected crash between the renames")

    monkeypatch.setattr(Fold, "_swap_in", crash)
    with pytest.raises(RuntimeError, match="injected"):
        _fold(run, "steps=10")
    staged = _model_bytes(run / "fold" / "1")
    monkeypatch.undo()
    result = _fold(run, "steps=10")
    assert sorted(result.folded) == sorted(NEW)
    assert _model_bytes(run) == staged and {p.name: p.read_bytes() for p in (run / "model.prev").iterdir()} == old_model


# ----------------------------------------------------------------------------- issue 16: fold without forgetting


def _assert_every_item_served(run: Path) -> None:
    """The run loads, nothing is quarantined, and every live item is on the generative path or in the fallback."""
    trained = set(json.loads((run / "item_ids.json").read_text()))
    r = Retriever.from_run(run, device="cpu")
    try:
        assert not r.catalog.quarantined
        fallback = set(r.fallback.item_ids)
        generative = {i for i in r.id_tokenizer.item_ids if i not in fallback}
        assert generative | fallback == trained | set(NEW) and not generative & fallback
        assert len(r.search(["a white car", "a red dog"], k=5, num_beams=5)[0]) > 0
    finally:
        r.close()


@pytest.mark.parametrize("point", ["staged", "swapping", "exchange", "swapped", "folded", "done"])
def test_a_crash_at_any_point_of_a_fold_leaves_a_loadable_run_serving_every_item(run, monkeypatch, point):
    import ace.pipeline.fold as fold_mod

    real_set, real_exchange = fold_mod._set_phase, fold_mod._exchange
    if point == "exchange":   # the model swapped in, the identifiers not yet
        calls = []

        def exchange(a, b):
            if calls:
                raise RuntimeError("injected crash between the two swaps")
            calls.append(a)
            return real_exchange(a, b)

        monkeypatch.setattr(fold_mod, "_exchange", exchange)
    else:
        def set_phase(fold_dir, phase, **info):
            if phase == point:
                raise RuntimeError(f"injected crash before phase {phase}")
            real_set(fold_dir, phase, **info)

        monkeypatch.setattr(fold_mod, "_set_phase", set_phase)
    with pytest.raises(RuntimeError, match="injected"):
        _fold(run, "steps=10")
    assert (run / "model").is_dir() and (run / "identifiers").is_dir()
    _assert_every_item_served(run)
    monkeypatch.undo()
    result = _fold(run, "steps=10")
    assert sorted(result.folded) == sorted(NEW) and result.fold_dir.name == "1"
    with ItemStore(run / "store.sqlite") as store:
        assert store.count(source="folded") == len(NEW) and store.count(source="added") == 0
    _assert_every_item_served(run)
    assert json.loads((run / "fold_report.json").read_text())["folded"] == result.folded


def test_the_gate_keeps_items_in_the_fallback_when_the_generative_path_is_worse(run):
    """Constructed case: a fine-tuning too small to learn the new items (1 step, tiny lr), so their
    generative recall (R@1 here) stays below the fallback's; those items stay in the fallback, served there."""
    old_model = _model_bytes(run)
    result = _fold(run, "gate=true", "steps=1", "lr=1e-7", "warmup_steps=0", "checkpoint_every=1", "top_k=1")
    gate = json.loads((result.fold_dir / "gate.json").read_text())
    report = json.loads((run / "fold_report.json").read_text())
    assert report["gate"] == gate and set(report["stayed"]) == set(result.stayed)
    worse = [i for i, d in gate["items"].items() if d["generative"] is not None and d["generative"] < d["fallback"]]
    assert len(worse) >= 3, gate["items"]                    # the constructed case: the generative path is worse
    assert set(worse) <= set(result.stayed) and not set(worse) & set(result.folded)
    assert sorted(result.folded + result.stayed) == sorted(NEW)
    with ItemStore(run / "store.sqlite") as store:
        assert {it.item_id for it in store.list_active(source="added")} == set(result.stayed)
    if not result.folded:
        assert _model_bytes(run) == old_model and not (run / "model.prev").exists()
    text = (result.fold_dir / "report.md").read_text()
    assert "stay in the fallback" in text and f"| {worse[0]} |" in text
    r = Retriever.from_run(run, device="cpu")
    try:
        assert set(r.fallback.item_ids) == set(result.stayed)     # still served, by the fallback
        hits = r.search_fallback([_captions(i)[0] for i in worse], k=5)
        assert all(i in [h.item_id for h in row] for i, row in zip(worse, hits))
    finally:
        r.close()
    _assert_every_item_served(run)


MORE = ["purple-kite", "orange-lamp"]


def test_a_second_fold_after_more_adds_starts_from_the_folded_model(run):
    from ace.pipeline.fold import _fingerprint

    first = _fold(run, "steps=20")
    assert sorted(first.folded) == sorted(NEW)
    folded_model = _fingerprint(run / "model")
    assert json.loads((first.fold_dir / "plan.json").read_text())["base_model"] != folded_model
    emb = np.load(run / "embeddings.npy")
    r = Retriever.from_run(run, device="cpu")
    r.add_items([CorpusItem(iid, "image", captions=[tpl.format(c=iid.split("-")[0], t=iid.split("-")[1]) for tpl in
                                                    ("a {c} {t}", "the {t} is {c}", "photo of a {c} {t}")],
                            embedding=(emb[3 * j] + emb[3 * j + 7]) / np.linalg.norm(emb[3 * j] + emb[3 * j + 7]))
                 for j, iid in enumerate(MORE)])
    r.close()
    second = _fold(run, "steps=20", "min_replay=1000")
    assert second.fold_dir.name == "2" and sorted(second.folded) == sorted(MORE)
    assert json.loads((second.fold_dir / "plan.json").read_text())["base_model"] == folded_model
    assert _fingerprint(run / "model.prev") == folded_model and _fingerprint(run / "model") != folded_model
    split = json.loads((second.fold_dir / "split.json").read_text())
    assert {i for _, i in split["replay"]} & set(NEW)          # the first fold's items are replayed as old ones
    with ItemStore(run / "store.sqlite") as store:
        assert {it.item_id for it in store.list_active(source="folded")} == set(NEW) | set(MORE)
    r = Retriever.from_run(run, device="cpu")
    try:
        assert len(r.fallback) == 0 and set(NEW) | set(MORE) <= set(r.id_tokenizer.item_ids)
    finally:
        r.close()


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """The tiny run with the recipe's model shape (frozen MiniLM encoder, prototype heads) and the hybrid
    operating point (20 training queries held out to fit w); 6 items added."""
    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline

    base = tmp_path_factory.mktemp("fold_recipe")
    path = _config(base)
    text = path.read_text()
    text = text.replace("model: {d_model: 32, n_heads: 2, encoder_layers: 2, decoder_layers: 1, ffn_dim: 64, query_vocab_size: 60}",
                        "model: {pretrained_encoder: minilm, d_model: 384, n_heads: 6, encoder_layers: 3, decoder_layers: 1, "
                        "ffn_dim: 64, max_query_length: 16, prototype_levels: 2}")
    text = text.replace("training: {batch_size: 30,", "training: {freeze_encoder: true, batch_size: 30,")
    text = text.replace("split: {test_captions: [-1]}", "split: {test_captions: [-1], scorer_queries: 20}")
    text += "hybrid: {enabled: true, candidates: 5, weights: [0.0, 1.0, 4.0, 16.0]}\n"
    assert "minilm" in text and "freeze_encoder" in text and "scorer_queries" in text
    path.write_text(text)
    Pipeline(load_config(RunConfig, path), progress=False).run_all(until="hybrid")
    _add_new_items(base, base / "run")
    return base / "run"


def test_fold_on_the_recipe_model_moves_only_the_decoder_fills_the_prototype_tables_and_serves_its_offset(recipe_run, tmp_path):
    from ace.model.modeling import AceModel, prefix_prototypes

    run = Path(shutil.copytree(recipe_run, tmp_path / "run"))   # the fixture stays unfolded for the other tests
    result = _fold(run, "steps=20", "offset_grid=[-3.0]")
    assert sorted(result.folded) == sorted(NEW) and result.metrics["frozen_encoder"] is True
    new, old = (AceModel.from_pretrained(str(run / name)).state_dict() for name in ("model", "model.prev"))
    assert all(torch_equal(new[k], old[k]) for k in new if k.startswith("encoder."))
    moved = [k for k in new if not k.startswith("encoder.") and not torch_equal(new[k], old[k])]
    assert any(k.startswith("decoder.embed") for k in moved) and any("layers" in k for k in moved)
    # the prototype tables are rebuilt over the trained and the folded items' vectors
    ids = json.loads((run / "item_ids.json").read_text())
    vectors = dict(zip(ids, np.load(run / "embeddings.npy")))
    with ItemStore(run / "store.sqlite") as store:
        vectors.update({i: store.get(i).embedding for i in NEW})
    r = Retriever.from_run(run, device="cpu")
    try:
        items, codes = r.id_tokenizer.item_ids, r.id_tokenizer.codes
    finally:
        r.close()
    level0, level1 = prefix_prototypes(codes, np.stack([vectors[i] for i in items]), r.id_tokenizer.level_sizes, 2)
    assert np.allclose(new["decoder.prototypes.level0"].numpy(), level0, atol=1e-6)
    assert np.allclose(new["decoder.prototypes.level1"].numpy(), level1, atol=1e-6)
    assert not np.allclose(old["decoder.prototypes.level1"].numpy(), level1, atol=1e-6)
    _check_folded_offsets(run, result)   # (the hybrid run's folds fit a log-prob offset: one fold more)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.parametrize("gate_path", ["served", "generative"])
def test_the_gate_measures_a_hybrid_run_as_served(recipe_run, tmp_path, gate_path):
    """gate_path=served on a hybrid run: old and new items' validation recall through merged search as
    served (the candidates in the fallback before the fold), with no validation query inside any item
    vector; gate_path=generative: beam search alone against the fallback alone, as the Retriever gives them."""
    from ace.metrics import retrieval_metrics

    run = Path(shutil.copytree(recipe_run, tmp_path / "run"))
    result = _fold(run, "gate=true", "steps=2", "checkpoint_every=1", f"gate_path={gate_path}")
    gate = json.loads((result.fold_dir / "gate.json").read_text())
    split = json.loads((result.fold_dir / "split.json").read_text())
    before = json.loads((result.fold_dir / "gate_before.json").read_text())
    val_old, val_new = [tuple(p) for p in split["val_old"]], [tuple(p) for p in split["val_new"]]
    assert val_old and val_new
    assert ("hybrid-scored" in (result.fold_dir / "report.md").read_text()) == (gate_path == "served")
    if gate_path == "served":
        assert gate["path"] == before["path"] == "hybrid" and gate["fallback_bar"] == "merged search (as served)"
        return
    r = Retriever.from_run(recipe_run, device="cpu")   # the untouched fixture: the run before the fold
    try:
        def metrics(rows, pairs):
            return retrieval_metrics([[h.item_id for h in row] for row in rows], [t for _, t in pairs])

        old = r.search_generative([q for q, _ in val_old], k=5, num_beams=5)
        alone = r.search_fallback([q for q, _ in val_new], k=5)
    finally:
        r.close()
    assert gate["path"] == "generative" and gate["fallback_bar"] == "fallback alone"
    assert before["new_fallback"] == pytest.approx(metrics(alone, val_new) | {"queries": len(val_new)})
    assert before["old_before"] == pytest.approx(metrics(old, val_old) | {"queries": len(val_old)})


def test_old_bar_auto_is_served_on_a_hybrid_run_and_unshared_elsewhere(recipe_run, base_run):
    """old_bar=auto (the default): merged search as served where the run has a hybrid scorer and the gate measures
    it (gate_path=served); the old items alone on a run without one, or with gate_path=generative."""
    assert FoldConfig().old_bar == "auto"
    assert Fold(recipe_run, FoldConfig()).cfg.old_bar == "served"
    assert Fold(recipe_run, FoldConfig(gate_path="generative")).cfg.old_bar == "unshared"
    assert Fold(base_run, FoldConfig()).cfg.old_bar == "unshared"
    assert Fold(recipe_run, FoldConfig(old_bar="unshared")).cfg.old_bar == "unshared"   # an explicit choice stays


def test_old_bar_served_measures_old_items_with_the_candidates_in_the_fallback(recipe_run, tmp_path):
    """old_bar=served: the old items' validation queries before the fold go through merged search with the
    candidates in the fallback (the gate's own hybrid_rows, validation queries out of the vectors); an added
    competitor can only push a gold item down, so no query is found that the unshared bar misses."""
    from ace.model.modeling import AceModel
    from ace.newitems.hybrid import HybridScorer
    from ace.pipeline import fold_gate
    from ace.pipeline.fold_measure import GateView, hybrid_rows

    run = Path(shutil.copytree(recipe_run, tmp_path / "run"))
    result = _fold(run, "gate=true", "steps=2", "checkpoint_every=1", "old_bar=served")
    before = json.loads((result.fold_dir / "gate_before.json").read_text())
    split = json.loads((result.fold_dir / "split.json").read_text())
    split = {k: [tuple(p) for p in split[k]] for k in ("val_old", "val_new")}
    items = json.loads((result.fold_dir / "plan.json").read_text())["items"]
    gate = json.loads((result.fold_dir / "gate.json").read_text())
    assert before["old_bar"] == gate["old_bar"] == "served" and split["val_old"]
    cfg = FoldConfig(num_beams=5, top_k=5, progress=False)     # FOLD's
    r = Retriever.from_run(recipe_run, device="cpu")   # the run before the fold
    try:
        with ItemStore(recipe_run / "store.sqlite") as store:
            view = GateView(recipe_run, HybridScorer.load(recipe_run), split,
                            lambda ids: [store.get(i).to_corpus_item() for i in ids])
            tok = r.id_tokenizer
            old_rows = [i for i, iid in enumerate(tok.item_ids) if iid not in set(items)]
            model = AceModel.from_pretrained(str(recipe_run / "model")).eval()
            hits = {bar: fold_gate.hits(hybrid_rows(recipe_run, cfg, model, tok, old_rows, split["val_old"], view,
                                                    fallback=shared), split["val_old"], 5)
                    for bar, shared in (("served", items), ("unshared", []))}
    finally:
        r.close()
    assert before["old_hits"] == hits["served"]
    assert all(u or not s for s, u in zip(hits["served"], hits["unshared"]))


def test_the_gate_view_scores_like_merged_search_and_keeps_validation_queries_out_of_item_vectors(recipe_run):
    """fold_measure.hybrid_rows with no validation query equals the Retriever's merged search (added items
    in the fallback); with validation queries, none of them is in the texts of its item's vector, and an
    old item's vector is rebuilt without it (the stored one averages every training query)."""
    from ace.model.modeling import AceModel
    from ace.newitems.hybrid import HybridScorer, encode_texts, mean_vectors
    from ace.pipeline.fold_measure import GateView, hybrid_rows
    from ace.run_folder import read_pairs

    cfg = FoldConfig(num_beams=5, top_k=5, progress=False)
    scorer = HybridScorer.load(recipe_run)
    r = Retriever.from_run(recipe_run, device="cpu")
    try:
        with ItemStore(recipe_run / "store.sqlite") as store:
            def items_of(ids):
                return [store.get(i).to_corpus_item() for i in ids]

            tok = r.id_tokenizer
            added = [it.item_id for it in store.list_active(source="added")]
            old_rows = [r_ for r_, i in enumerate(tok.item_ids) if i not in set(added)]   # the table holds added items too
            queries = [_captions(i)[0] for i in NEW] + [q for q, _ in read_pairs(recipe_run / "test_queries.json")[:10]]
            pairs = [(q, "x") for q in queries]
            served = r.search(queries, k=5, num_beams=5, mode="hybrid")
            assert {h.source for row in served for h in row} >= {"fallback"}
            empty = GateView(recipe_run, scorer, {"val_old": [], "val_new": []}, items_of)
            assert hybrid_rows(recipe_run, cfg, r.model, tok, old_rows, pairs, empty, fallback=added) == \
                [[h.item_id for h in row] for row in served]
            old_pair = read_pairs(recipe_run / "scorer_queries.json")[0]
            new_pair = (_captions(NEW[0])[1], NEW[0])
            view = GateView(recipe_run, scorer, {"val_old": [old_pair], "val_new": [new_pair]}, items_of)
            old_item, new_item = view.items_of([old_pair[1], NEW[0]])
            assert old_pair[0] not in old_item.captions and old_item.captions
            assert new_pair[0] not in new_item.captions and new_item.captions
            assert old_pair[1] not in view.scorer.vectors.row and old_pair[1] in scorer.vectors.row
            model = AceModel.from_pretrained(str(recipe_run / "model")).eval()
            rebuilt = mean_vectors([old_item.captions], lambda t: encode_texts(model, r.query_tokenizer, t), [old_pair[1]])
            stored = scorer.vectors.cosine(rebuilt, np.array([[scorer.vectors.row[old_pair[1]]]]))[0, 0]
            assert stored < 0.9999                       # the stored vector also averages the held-out query
    finally:
        r.close()


def _check_folded_offsets(run: Path, first) -> None:
    """After a first fold of a hybrid run with offset_grid=[-3]: gate.json and the report record the offset, the
    swapped-in model carries it (RUN/model/folded_offsets.json) and the Retriever's hybrid search adds it to
    those items' log-probs; a second fold (offset_grid=[-1]) keeps the first fold's offsets beside its own."""
    cal = json.loads((first.fold_dir / "gate.json").read_text())["calibration"]
    assert cal["offset"] == -3.0 and cal["half_offsets"] == [-3.0, -3.0] and len(cal["table"]) == 1
    assert "log-prob offset: -3" in (first.fold_dir / "report.md").read_text()
    doc = json.loads((run / "model" / "folded_offsets.json").read_text())
    assert doc["offsets"] == {i: -3.0 for i in NEW} and doc["folds"]["1"]["offset"] == -3.0
    assert not (run / "model.prev" / "folded_offsets.json").exists()
    r = Retriever.from_run(run, device="cpu")
    try:
        assert r.hybrid.offsets == {i: -3.0 for i in NEW}
        queries = [_captions(i)[0] for i in NEW]
        served = r.search(queries, k=5, num_beams=5, mode="hybrid")
        r.hybrid.offsets = {}
        plain = r.search(queries, k=5, num_beams=5, mode="hybrid")
        pairs = [(a, b) for row_a, row_b in zip(served, plain) for a in row_a for b in row_b if a.item_id == b.item_id]
        assert any(a.item_id in NEW for a, _ in pairs)
        for a, b in pairs:
            assert a.raw_score == pytest.approx(b.raw_score + (-3.0 if a.item_id in NEW else 0.0), abs=1e-5)
        emb = np.load(run / "embeddings.npy")
        r.hybrid.offsets = {i: -3.0 for i in NEW}
        r.add_items([CorpusItem(iid, "image", captions=[f"a {iid.split('-')[0]} {iid.split('-')[1]}",
                                                        f"photo of a {iid.replace('-', ' ')}"],
                                embedding=(emb[3 * j] + emb[3 * j + 7]) / np.linalg.norm(emb[3 * j] + emb[3 * j + 7]))
                     for j, iid in enumerate(MORE)])
    finally:
        r.close()
    second = _fold(run, "steps=2", "checkpoint_every=1", "offset_grid=[-1.0]")
    assert sorted(second.folded) == sorted(MORE)
    doc = json.loads((run / "model" / "folded_offsets.json").read_text())
    assert doc["offsets"] == {i: -3.0 for i in NEW} | {i: -1.0 for i in MORE} and set(doc["folds"]) == {"1", "2"}


def test_fold_texts_probe_reproduces_the_fold_report_as_served(recipe_run, tmp_path, capsys):
    """benchmarks/fold_texts_probe.py re-runs the gate's hybrid scoring before (RUN/model.prev, the candidates in
    the fallback) and after a fold: with the candidates' vectors built from all their texts it must give the
    fold report's own held-out figures (merged search as served), and on the validation queries the gate's own
    figures (gate.json: both sides before and after, the cross-fitted offset)."""
    import importlib.util

    run = Path(shutil.copytree(recipe_run, tmp_path / "run"))
    new = json.loads((recipe_run.parent / "new.json").read_text())
    (run / "added_test_queries.json").write_text(json.dumps([[r["captions"][-1], r["item_id"]] for r in new]))
    result = _fold(run, "gate=false", "steps=20", "offset_grid=[-3.0]")
    assert sorted(result.folded) == sorted(NEW)
    spec = importlib.util.spec_from_file_location("fold_texts_probe", Path(__file__).parents[1] / "benchmarks" / "fold_texts_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.main([str(run), "--out", str(tmp_path / "probe.json")])
    out = json.loads((tmp_path / "probe.json").read_text())
    metrics = json.loads((result.fold_dir / "metrics.json").read_text())
    gate = json.loads((result.fold_dir / "gate.json").read_text())
    served = out["test"][0]
    assert served["vectors"] == "all texts" and served["n"] == len(new)
    assert [r["vectors"] for r in out["test"][1:]] == ["no val query", "one more out"]
    assert out["test_old"]["after_by_offset"][f"{out['served_offset']:g}"] == pytest.approx(metrics["after"]["old_merged"])
    assert served["before"] == pytest.approx(metrics["before"]["folded_merged"])
    assert served["after"] == pytest.approx(metrics["after"]["folded_merged"])
    val = out["validation"][0]
    assert val["vectors"] == "gate (val)" and val["offset"] == gate["calibration"]["offset"] == out["served_offset"]
    assert (val["before"], val["after"]) == (pytest.approx(gate["new_fallback"]), pytest.approx(gate["new_generative"]))
    assert (val["old_before"], val["old_after"]) == (pytest.approx(gate["old_before"]), pytest.approx(gate["old_after"]))
    # the fold never holds out an item's document: every validation query is another one
    assert "query = its document" not in val and val["other queries"]["n"] == val["n"]
    assert "one more out" in capsys.readouterr().out
