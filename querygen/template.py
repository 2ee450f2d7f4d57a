"""``template`` backend: queries from structured metadata (label, tags, ...) through varied templates."""
from __future__ import annotations

import hashlib
import random
import string

from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, QueryBackend

MODALITY_NOUNS = {"image": ["photo", "picture", "image"], "audio": ["sound", "recording", "audio clip"],
                  "video": ["video", "clip", "footage"], "text": ["text", "passage", "document"]}

DEFAULT_TEMPLATES = [
    "{label}",
    "a {noun} of {label}",
    "{label} {noun}",
    "{noun} with {tags}",
    "{tags}",
    "{tag} {noun}",
    "{label}, {tag}",
    "{title}",
    "{category}: {label}",
    "find a {noun} showing {label}",
]


def _listify(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.replace(",", "|").split("|") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value)]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class TemplateBackend(QueryBackend):
    """Fills templates whose fields the item's metadata has; picks ``num_queries`` distinct renderings."""

    name = "template"

    def __init__(self, *, templates: list[str] | None = None, num_queries: int = 4, seed: int = 0, media_root=None):
        super().__init__(media_root=media_root)
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.num_queries, self.seed = num_queries, seed
        self.fields = [{f for _, f, _, _ in string.Formatter().parse(t) if f} for t in self.templates]

    def settings(self) -> dict:
        return {"templates": self.templates, "num_queries": self.num_queries, "seed": self.seed}

    def _values(self, item: CorpusItem, rng: random.Random) -> dict[str, str]:
        meta = item.metadata or {}
        labels = _listify(meta.get("label")) + _listify(meta.get("labels"))
        tags = _listify(meta.get("tags"))
        vals = {k: str(v) for k, v in meta.items() if isinstance(v, (str, int, float)) and str(v).strip()}
        if labels:
            vals["label"] = rng.choice(labels)
        pool = tags or labels
        if pool:
            vals["tags"] = _join(rng.sample(pool, min(len(pool), 3)))
            vals["tag"] = rng.choice(pool)
        vals["noun"] = rng.choice(MODALITY_NOUNS.get(item.modality, ["item"]))
        return vals

    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        self.stats.model_calls += 1
        self.stats.items += len(items)
        out = []
        for it in items:
            digest = hashlib.sha256(f"{self.seed}:{it.item_id}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "little"))
            vals = self._values(it, rng)
            usable = [i for i, f in enumerate(self.fields) if f <= vals.keys()]
            if not usable or usable == [i for i, f in enumerate(self.fields) if f <= {"noun"}]:
                self.skip(it, f"no template matches the metadata (keys: {sorted((it.metadata or {}).keys())})")
                continue
            rng.shuffle(usable)
            seen: set[str] = set()
            for i in usable:
                text = self.templates[i].format(**vals)
                if text.lower() not in seen:
                    seen.add(text.lower())
                    out.append(GeneratedQuery(it.item_id, text, f"template/{i}"))
                if len(seen) == self.num_queries:
                    break
        return out
