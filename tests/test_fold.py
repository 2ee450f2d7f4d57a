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
        "num_beams=5", "top_k=5", "eval_batch_size=50", "progress=false", "device=cpu"]


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


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A trained tiny run (30 items) with its fallback stage, and 6 more items added through the Retriever."""
    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline

    base = tmp_path_factory.mktemp("fold")
    Pipeline(load_config(RunConfig, _config(base)), progress=False).run_all(until="fallback")
    run = base / "run"
    new = json.loads((base / "new.json").read_text())
    retriever = Retriever.from_run(run, device="cpu")
    retriever.add_items([CorpusItem(r["item_id"], "image", captions=r["captions"][:-1],
                                    embedding=np.asarray(r["embedding"], np.float32) / np.linalg.norm(r["embedding"]))
                         for r in new])
    retriever.close()
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
    assert "| new items, generative path |" in (result.fold_dir / "report.md").read_text()


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
