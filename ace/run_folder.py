"""The run folder: where every pipeline stage writes its artefact, and how a stage knows it is done.

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


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "stages").mkdir(exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def _marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

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
    root_file = Path(run_dir) / "corpus_root.json"
    return json.loads(root_file.read_text())["root"] if root_file.is_file() else None


def load_run_embeddings(run_dir: str | Path):
    """(item ids, embeddings (N, D)) the encode stage wrote to RUN/item_ids.json and RUN/embeddings.npy."""
    import numpy as np

    run_dir = Path(run_dir)
    ids = json.loads((run_dir / "item_ids.json").read_text())
    emb = np.load(run_dir / "embeddings.npy")
    if len(ids) != len(emb):
        raise ValueError(f"{run_dir}: {len(ids)} item ids but {len(emb)} embeddings")
    return ids, emb


def load_run_corpus(run_dir: str | Path, name: str = "corpus.jsonl"):
    """A corpus table saved in a run folder, with the media root recorded beside it (already validated)."""
    from ace.data.corpus import load_corpus

    return load_corpus(Path(run_dir) / name, root=run_media_root(run_dir), validate=False)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a kill never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
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

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(MultiModalEncoderConfig, data.get("encoder") or {}, prefix="encoder.")
    except ConfigError as exc:
        raise RunFolderError(f"{path}: {exc}") from None
