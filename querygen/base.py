"""The query-generation contract: a backend turns corpus items into (item_id, query, source) rows."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from ace.arrays import resolve_device as _resolve_device
from ace.config import config_hash
from ace.data.corpus import CorpusItem


class QueryGenError(ValueError):
    """Query generation cannot go on (bad config, unloadable model, every item failed); the message says why."""


@dataclass
class GeneratedQuery:
    item_id: str
    query: str
    source: str                 # "<backend>/<prompt or caption index>", e.g. "paraphrase/2"
    prompt: str = ""            # instruction the query answered (for prompt-echo filtering), "" if none


@dataclass
class ItemFailure:
    item_id: str
    reason: str


@dataclass
class BackendStats:
    """Counters a backend fills while generating (summed over calls)."""
    model_calls: int = 0        # generate() calls on the backend
    items: int = 0              # items passed to generate()
    sequences: int = 0          # sequences decoded by a model
    generated_tokens: int = 0   # new tokens decoded by a model (up to EOS)
    extra: dict = field(default_factory=dict)


class QueryBackend(ABC):
    """Base class: ``generate(items) -> list[GeneratedQuery]``; per-item problems go through ``skip``."""

    name: str = ""

    def __init__(self, *, media_root: str | Path | None = None):
        self.media_root = Path(media_root) if media_root else None
        self.stats = BackendStats()
        self._failures: list[ItemFailure] = []

    @abstractmethod
    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        """Queries for ``items``; items that cannot be processed are reported with ``skip`` and left out."""

    @abstractmethod
    def settings(self) -> dict:
        """Everything that changes the output (model, prompts, sampling...); hashed into the cache key."""

    def fingerprint(self) -> str:
        return config_hash({"backend": self.name, **self.settings()})

    def skip(self, item: CorpusItem, reason: str) -> None:
        self._failures.append(ItemFailure(item.item_id, reason))

    def pop_failures(self) -> list[ItemFailure]:
        out, self._failures = self._failures, []
        return out

    def media_path(self, item: CorpusItem) -> Path | None:
        """Absolute media path of ``item`` (relative paths resolve against ``media_root``), or None."""
        if not item.media:
            return None
        path = Path(item.media)
        if not path.is_absolute() and self.media_root is not None:
            path = self.media_root / path
        return path


def resolve_device(device: str = "auto") -> str:
    """ace.arrays.resolve_device with QueryGenError."""
    return _resolve_device(device, error=QueryGenError)
