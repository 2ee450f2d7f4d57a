"""The run folder: the one owner of its layout (every file name is spelled here), its typed readers
and writers, and how a stage knows it is done.

    RUN/config.yaml  corpus.jsonl  corpus_train.jsonl  corpus_root.json  embeddings.npy  item_ids.json
        identifiers/  queries/  train_queries.json  test_queries.json  model/  query_tokenizer/
        identifier_vocab.json  checkpoints/  train_log.jsonl  fallback/  metrics.json  report.md  plots/
        cache/  stages/  store.sqlite  store.lock  fold/  identifier_vectors.npy  pretrain.json
        encode_shards/ (while the encode stage runs)

``RunPaths(run_dir)`` names every entry (``paths.model``, ``paths.train_queries``, ...) without
touching the disk; ``RunFolder`` (the pipeline's writer) creates the folder and records stages.
A stage is *done* when ``stages/<name>.json`` exists and records the same key (a hash of the
stage's config and of its inputs' keys). Re-running the pipeline skips done stages; changing a
config value re-runs that stage and every stage after it, because their keys chain.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunFolderError(ValueError):
    """A run-folder file is missing or malformed; the message names the file."""


def _entry(name: str, doc: str) -> property:
    return property(lambda self: self.path / name, doc=f"RUN/{name}: {doc}")


class RunPaths:
    """Named paths of a run folder (nothing is created or read)."""

    CONFIG, CORPUS, CORPUS_TRAIN, CORPUS_ROOT = "config.yaml", "corpus.jsonl", "corpus_train.jsonl", "corpus_root.json"
    EMBEDDINGS, ITEM_IDS, IDENTIFIERS, QUERIES = "embeddings.npy", "item_ids.json", "identifiers", "queries"
    TRAIN_QUERIES, TEST_QUERIES = "train_queries.json", "test_queries.json"
    MODEL, QUERY_TOKENIZER, IDENTIFIER_VOCAB = "model", "query_tokenizer", "identifier_vocab.json"
    CHECKPOINTS, TRAIN_LOG, FALLBACK, CALIBRATION = "checkpoints", "train_log.jsonl", "fallback", "calibration.json"
    METRICS, REPORT, PLOTS, CACHE, STAGES = "metrics.json", "report.md", "plots", "cache", "stages"
    STORE, STORE_LOCK, RELOAD_LOCK, FOLD = "store.sqlite", "store.lock", "reload.lock", "fold"
    IDENTIFIER_VECTORS, PRETRAIN = "identifier_vectors.npy", "pretrain.json"
    SCORER_QUERIES, HYBRID = "scorer_queries.json", "hybrid"
    QUERY_ORIGINS = "query_origins.json"
    FOLD_REPORT, FOLDED_OFFSETS = "fold_report.json", "folded_offsets.json"
    ENCODE_SHARDS = "encode_shards"
    # what a trained run needs to be served (Retriever.from_run) or folded (+ config.yaml)
    TRAINED = (MODEL, QUERY_TOKENIZER, IDENTIFIER_VOCAB, IDENTIFIERS, CORPUS)

    config = _entry(CONFIG, "the RunConfig the pipeline ran with")
    corpus = _entry(CORPUS, "every item (the corpus table)")
    corpus_train = _entry(CORPUS_TRAIN, "the items with their held-out captions removed")
    corpus_root = _entry(CORPUS_ROOT, "the media root of the corpus")
    embeddings = _entry(EMBEDDINGS, "item embeddings (N, D) float32, rows as item_ids.json")
    item_ids = _entry(ITEM_IDS, "item ids of the embedding rows")
    identifiers = _entry(IDENTIFIERS, "the SemanticIdTokenizer")
    queries = _entry(QUERIES, "the generated query dataset")
    train_queries = _entry(TRAIN_QUERIES, "[[query, item_id], ...] training pairs")
    test_queries = _entry(TEST_QUERIES, "[[query, item_id], ...] held-out pairs")
    model = _entry(MODEL, "AceModel (save_pretrained)")
    query_tokenizer = _entry(QUERY_TOKENIZER, "the QueryTokenizer")
    identifier_vocab = _entry(IDENTIFIER_VOCAB, "the IdentifierVocab")
    checkpoints = _entry(CHECKPOINTS, "training checkpoints (step-N/)")
    train_log = _entry(TRAIN_LOG, "one JSON line per training log / eval event")
    fallback = _entry(FALLBACK, "query tower, hash head, empty binary index, calibration")
    metrics = _entry(METRICS, "held-out metrics of the eval stage")
    report = _entry(REPORT, "the run report")
    plots = _entry(PLOTS, "the report's plots")
    cache = _entry(CACHE, "caches (teacher vectors, ...)")
    stages = _entry(STAGES, "one marker per finished stage")
    store = _entry(STORE, "items added / folded / deleted after training (SQLite)")
    store_lock = _entry(STORE_LOCK, "the writer lock of the item store")
    reload_lock = _entry(RELOAD_LOCK, "held by the one server of the run reloading its model (SQLite store)")
    fold = _entry(FOLD, "one folder per fold of added items into the model")
    fold_report = _entry(FOLD_REPORT, "the latest fold's report: what was folded, what stayed and why")
    folded_offsets = property(lambda self: self.model / self.FOLDED_OFFSETS,
                              doc="RUN/model/folded_offsets.json: per folded item, the log-prob offset its fold fitted "
                                  "(hybrid search; swapped in with the model it calibrates)")
    identifier_vectors = _entry(IDENTIFIER_VECTORS, "item + query vectors the identifiers were built from (issue 19)")
    pretrain = _entry(PRETRAIN, "what identifier-space pretraining used (issue 19)")
    query_origins = _entry(QUERY_ORIGINS, "per training pair, the base pair it derives from (issue 19 lever 2; "
                                          "ace/pipeline/query_pairs.py); absent = no derived queries")
    scorer_queries = _entry(SCORER_QUERIES, "[[query, item_id], ...] training queries held out of training (hybrid w)")
    hybrid = _entry(HYBRID, "hybrid scorer: item vectors + fitted weight (ace/newitems/hybrid.py)")
    hybrid_scorer = property(lambda self: self.hybrid / "scorer.json",
                             doc="RUN/hybrid/scorer.json: present when the run serves hybrid search (its fitted w, storage, ...)")
    encode_shards = _entry(ENCODE_SHARDS, "the encode stage's shards while it runs (ace/pipeline/encode_stage.py)")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def missing(self, names=TRAINED) -> list[str]:
        """The entries of ``names`` that do not exist."""
        return [n for n in names if not (self.path / n).exists()]


class RunFolder(RunPaths):
    """The run folder the pipeline writes: created on construction, with its stage markers."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stages.mkdir(exist_ok=True)

    def _marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def stage_record(self, stage: str) -> dict | None:
        marker = self._marker(stage)
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None  # a torn marker means "not done": the stage re-runs

    def is_done(self, stage: str, key: str) -> bool:
        record = self.stage_record(stage)
        return record is not None and record.get("key") == key

    def mark_done(self, stage: str, key: str, info: dict[str, Any] | None = None) -> None:
        write_json_atomic(self._marker(stage), {"stage": stage, "key": key, "finished": time.time(), **(info or {})})

    def invalidate(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)


def run_media_root(run_dir: str | Path) -> str | None:
    """The corpus media root the corpus stage recorded in RUN/corpus_root.json (None: absent or no root)."""
    root_file = RunPaths(run_dir).corpus_root
    return json.loads(root_file.read_text())["root"] if root_file.is_file() else None


def load_run_embeddings(run_dir: str | Path):
    """(item ids, embeddings (N, D)) the encode stage wrote to RUN/item_ids.json and RUN/embeddings.npy."""
    import numpy as np

    paths = RunPaths(run_dir)
    ids = json.loads(paths.item_ids.read_text())
    emb = np.load(paths.embeddings)
    if len(ids) != len(emb):
        raise ValueError(f"{paths.path}: {len(ids)} item ids but {len(emb)} embeddings")
    return ids, emb


def load_run_corpus(run_dir: str | Path, name: str = RunPaths.CORPUS):
    """A corpus table saved in a run folder, with the media root recorded beside it (already validated)."""
    from ace.data.corpus import load_corpus

    return load_corpus(Path(run_dir) / name, root=run_media_root(run_dir), validate=False)


class LockBusy(RuntimeError):
    """Another process holds a run's lock file; ``holder`` is its pid as written in the file ("?" if none)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by process {holder}")
        self.path, self.holder = path, holder


def take_lock(path: str | Path):
    """This process takes an exclusive, non-blocking ``flock`` on ``path`` (created if needed) and writes
    its pid into it; returns the open file: closing it (or ending a ``with`` block) releases the lock.
    LockBusy when another process holds it. Used for RUN/store.lock (item writes) and RUN/fold/LOCK."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise LockBusy(Path(path), holder) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def write_npy_atomic(path: str | Path, array) -> None:
    """np.save through a temp file + rename (a kill never leaves a torn .npy)."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def read_encoder_config(run_dir: str | Path):
    """The run's item-encoder config (RUN/config.yaml, section ``encoder``), or None when absent."""
    import yaml

    from ace.config import ConfigError, from_dict
    from ace.data.encoders import MultiModalEncoderConfig

    path = RunPaths(run_dir).config
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(MultiModalEncoderConfig, data.get("encoder") or {}, prefix="encoder.")
    except ConfigError as exc:
        raise RunFolderError(f"{path}: {exc}") from None


def copy_trained_run(src: str | Path, dst: str | Path) -> Path:
    """A fresh copy of a trained run as the pipeline left it (``dst`` replaced): without checkpoints,
    caches, plots, the item store and its lock, folds (and the fold report), or the model/identifiers a fold replaced."""
    import shutil

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    skip = (RunPaths.CHECKPOINTS, RunPaths.CACHE, RunPaths.PLOTS, RunPaths.FOLD, RunPaths.STORE + "*",
            RunPaths.STORE_LOCK, RunPaths.RELOAD_LOCK, RunPaths.MODEL + ".prev", RunPaths.IDENTIFIERS + ".prev",
            RunPaths.FOLD_REPORT, RunPaths.ENCODE_SHARDS)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def read_pairs(path: str | Path, *, missing_ok: bool = False) -> list[tuple[str, str]]:
    """A pairs file (train_queries.json, test_queries.json, fold pairs): [[query, item_id], ...] ->
    (query, item_id) tuples; RunFolderError naming the file when it is not that. ``missing_ok``: a
    missing file reads as no pairs."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise RunFolderError(f"pairs file not found: {path}")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 for r in rows):
        raise RunFolderError(f"{path} must hold a JSON list of [query, item_id] pairs")
    return [(str(q), str(i)) for q, i in rows]


def read_query_origins(run_dir: str | Path) -> list[int] | None:
    """RUN/query_origins.json (a list of ints, one per training pair), or None when the run has none."""
    path = RunPaths(run_dir).query_origins
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(o, int) and not isinstance(o, bool) for o in rows):
        raise RunFolderError(f"{path} must hold a JSON list of integers (one per training pair)")
    return rows


def write_pairs(path: str | Path, pairs) -> None:
    """(query, item_id) pairs -> a pairs file, atomically."""
    write_json_atomic(path, [[q, i] for q, i in pairs])


def model_version(run_dir: str | Path) -> str | None:
    """Short content hash of RUN/model (every file's name and bytes): the same on every replica that serves
    the same model files, new after training or ``train.py fold``; None without a model folder."""
    import hashlib

    folder = RunPaths(run_dir).model
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
