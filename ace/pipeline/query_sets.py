"""Query sets judged by item metadata: free-form queries a person would type, each with the
attributes that make a hit relevant (not one target item).

A query set is a JSON-lines file, one query per line::

    {"query": "a red square", "relevant": {"colour": "red", "shape": "square"}}
    {"query": "a beeping alarm", "modality": "audio", "relevant": {"sound": ["tone", "buzz"]}}

A corpus item is relevant to a query when its ``metadata`` has every listed attribute with the
given value (or one of the listed values) and, if ``modality`` is given, it is of that modality.
Every query must have at least one relevant item in the corpus. ``data/demo_queries.jsonl`` is the
demo's newcomer set; the pipeline's eval stage scores every file in ``eval.query_sets``
(top-1 / top-5 relevant, ``ace.metrics.relevance_metrics``) and the report shows the figures.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ace.metrics import relevance_metrics


class QuerySetError(ValueError):
    """A query set file is malformed or names attributes no item can satisfy; the message says where."""


@dataclass(frozen=True)
class JudgedQuery:
    query: str
    relevant: dict[str, tuple[str, ...]]   # attribute -> accepted values
    modality: str | None = None

    def is_relevant(self, item) -> bool:
        if self.modality is not None and item.modality != self.modality:
            return False
        meta = item.metadata or {}
        return all(str(meta.get(k)) in values for k, values in self.relevant.items())

    def group(self) -> str:
        return self.modality or "any modality"


def load_query_set(path: str | Path) -> list[JudgedQuery]:
    path = Path(path)
    if not path.is_file():
        raise QuerySetError(f"query set {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuerySetError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise QuerySetError(f"{where}: each line must be a JSON object")
        unknown = set(row) - {"query", "relevant", "modality"}
        if unknown:
            raise QuerySetError(f"{where}: unknown keys {sorted(unknown)} (allowed: query, relevant, modality)")
        query, rel, modality = row.get("query"), row.get("relevant"), row.get("modality")
        if not isinstance(query, str) or not query.strip():
            raise QuerySetError(f"{where}: 'query' must be a non-empty string")
        if not isinstance(rel, dict) or not rel:
            raise QuerySetError(f"{where}: 'relevant' must be a non-empty object of attribute: value(s)")
        values = {}
        for k, v in rel.items():
            vs = v if isinstance(v, list) else [v]
            if not vs or not all(isinstance(x, str) and x for x in vs):
                raise QuerySetError(f"{where}: relevant[{k!r}] must be a string or a non-empty list of strings")
            values[k] = tuple(vs)
        if modality is not None and not isinstance(modality, str):
            raise QuerySetError(f"{where}: 'modality' must be a string")
        out.append(JudgedQuery(query.strip(), values, modality))
    if not out:
        raise QuerySetError(f"query set {path} has no queries")
    return out


def query_set_digest(paths: Iterable[str | Path]) -> str:
    """Content hash of the query set files (part of the eval stage's key: editing a set re-runs eval)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise QuerySetError(f"query set {p} not found")
        h.update(str(p).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def relevant_sets(queries: list[JudgedQuery], items, source: str = "query set") -> list[set[str]]:
    """Relevant item ids per query; a query no item satisfies is an error (it could never be answered)."""
    sets = [{it.item_id for it in items if q.is_relevant(it)} for q in queries]
    empty = [q.query for q, s in zip(queries, sets) if not s]
    if empty:
        raise QuerySetError(f"{source}: no item in the corpus is relevant to {len(empty)} queries: {empty[:5]} "
                            "(check the attribute names and values against the items' metadata)")
    return sets


def evaluate_query_set(retriever, path: str | Path, *, num_beams: int | None = None, k: int = 10,
                       batch_size: int = 100, **search_kw) -> dict:
    """Top-1 / top-5 relevant over the set (and per group), plus each query's first results, for a Retriever."""
    queries = load_query_set(path)
    rel = relevant_sets(queries, retriever.corpus.items, source=str(path))
    hits = retriever.search([q.query for q in queries], k=k, num_beams=num_beams, batch_size=batch_size, **search_kw)
    rankings = [[h.item_id for h in row] for row in hits]
    by_group = {"all": relevance_metrics(rankings, rel)}
    for g in sorted({q.group() for q in queries}):
        idx = [i for i, q in enumerate(queries) if q.group() == g]
        by_group[g] = relevance_metrics([rankings[i] for i in idx], [rel[i] for i in idx])
    per_query = []
    for q, r, s in zip(queries, rankings, rel):
        first = next((i + 1 for i, item in enumerate(r) if item in s), None)
        per_query.append({"query": q.query, "first_relevant_rank": first, "top": r[:5], "relevant": len(s)})
    return {"path": str(path), "by_group": by_group, "queries": per_query}
