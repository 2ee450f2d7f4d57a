"""The corpus: a table of items (id, modality, media path or precomputed embedding, captions, metadata)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MODALITIES = ("image", "audio", "video", "text")


@dataclass
class CorpusItem:
    item_id: str
    modality: str                       # one of MODALITIES
    media: str | None = None            # path, relative to the corpus root or absolute
    embedding: np.ndarray | None = None # precomputed item embedding (D,), if any
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
