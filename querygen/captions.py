"""``captions`` backend: the corpus's own captions (all, or chosen indices) are the queries."""
from __future__ import annotations

from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, QueryBackend


class CaptionsBackend(QueryBackend):
    """Caption i of an item becomes a query with source "caption/i"."""

    name = "captions"

    def __init__(self, *, caption_indices: list[int] | None = None, media_root=None):
        super().__init__(media_root=media_root)
        self.caption_indices = list(caption_indices) if caption_indices is not None else None

    def settings(self) -> dict:
        return {"caption_indices": self.caption_indices}

    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        self.stats.model_calls += 1
        self.stats.items += len(items)
        out = []
        for it in items:
            n = len(it.captions)
            idx = range(n) if self.caption_indices is None else [i for i in self.caption_indices if -n <= i < n]
            picked = [(i % n, it.captions[i]) for i in idx if it.captions[i] and it.captions[i].strip()]
            if not picked:
                which = "" if self.caption_indices is None else f" at indices {self.caption_indices}"
                self.skip(it, f"no caption{which} (item has {n})")
                continue
            out.extend(GeneratedQuery(it.item_id, cap, f"caption/{i}") for i, cap in picked)
        return out
