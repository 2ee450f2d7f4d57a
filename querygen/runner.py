"""The query-generation runner: batches items through a backend, caches, filters, dedups, writes a dataset."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ace.config import to_dict
from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, ItemFailure, QueryBackend, QueryGenError
from .cache import QueryCache, item_inputs
from .config import QueryGenConfig
from .filters import NearDuplicateFilter, clean_query, degenerate_reason

log = logging.getLogger(__name__)


@dataclass
class QueryGenSummary:
    backend: str
    items: int = 0                      # corpus items considered
    items_from_cache: int = 0           # finished in an earlier run, not regenerated
    items_generated: int = 0            # finished in this run
    items_failed: int = 0               # reported and skipped in this run
    items_pending: int = 0              # not reached because max_seconds ran out (rerun to continue)
    items_with_queries: int = 0
    raw_queries: int = 0                # before filtering
    queries: int = 0                    # rows written
    dropped: dict = field(default_factory=dict)   # reason -> count (empty, too_short, prompt_echo, ...)
    queries_per_item: dict = field(default_factory=dict)  # mean / min / max over items with queries
    seconds: float = 0.0
    items_per_second: float = 0.0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0
    failures: list = field(default_factory=list)  # first failures: {"item_id", "reason"}
    dataset_path: str = ""

    def format(self) -> str:
        q = self.queries_per_item
        lines = [
            f"querygen [{self.backend}]: {self.queries} queries for {self.items_with_queries}/{self.items} items "
            f"({self.items_from_cache} from cache, {self.items_generated} generated, {self.items_failed} failed"
            + (f", {self.items_pending} pending: time budget used" if self.items_pending else "") + ")",
            f"  queries per item: mean {q.get('mean', 0):.2f}, min {q.get('min', 0)}, max {q.get('max', 0)}",
            f"  raw generations {self.raw_queries}; dropped: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"),
            f"  {self.seconds:.1f} s, {self.items_per_second:.2f} items/s"
            + (f", {self.tokens_per_second:.1f} generated tokens/s" if self.generated_tokens else ""),
        ]
        for f in self.failures[:5]:
            lines.append(f"  failed: {f['item_id']}: {f['reason']}")
        if self.dataset_path:
            lines.append(f"  dataset: {self.dataset_path}")
        return "\n".join(lines)


def _batches(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def generate_all(items: list[CorpusItem], backend: QueryBackend, *, config: QueryGenConfig, cache: QueryCache,
                 failures_path: Path | None = None) -> tuple[dict[str, list[GeneratedQuery]], list[ItemFailure], int]:
    """Run ``backend`` over the items not in ``cache``; returns (all raw queries by item, failures, #from cache)."""
    inputs = {it.item_id: item_inputs(it) for it in items}
    done = cache.load(inputs)
    ids = {it.item_id for it in items}
    done = {k: v for k, v in done.items() if k in ids}
    from_cache = len(done)
    todo = [it for it in items if it.item_id not in done]
    failures: list[ItemFailure] = []
    succeeded = from_cache
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), initial=from_cache, unit="item", desc=f"querygen[{backend.name}]", smoothing=0.1)
    try:
        for batch in _batches(todo, config.batch_size):
            queries = backend.generate(batch)
            failed = backend.pop_failures()
            failed_ids = {f.item_id for f in failed}
            finished: dict[str, list[GeneratedQuery]] = {it.item_id: [] for it in batch if it.item_id not in failed_ids}
            for q in queries:
                if q.item_id in finished:
                    finished[q.item_id].append(q)
            cache.append(finished, inputs)
            done.update(finished)
            succeeded += len(finished)
            if failed:
                failures.extend(failed)
                _log_failures(failed, failures_path)
                for f in failed:
                    tqdm.write(f"querygen: skipped {f.item_id}: {f.reason}")
            bar.update(len(batch))
            if config.max_seconds is not None and time.perf_counter() - t0 >= config.max_seconds:
                tqdm.write(f"querygen: time budget of {config.max_seconds:.0f} s used; stopping after this batch "
                           "(rerun with the same output folder to continue)")
                break
            if succeeded == 0 and len(failures) >= config.abort_after_failures:
                raise QueryGenError(
                    f"the first {len(failures)} items all failed (e.g. {failures[0].item_id}: {failures[0].reason}); "
                    "stopping - check the model, the media paths and media_root")
    finally:
        bar.close()
    return done, failures, from_cache


def _log_failures(failed: list[ItemFailure], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for f in failed:
            fh.write(json.dumps(asdict(f), ensure_ascii=False) + "\n")


def filter_queries(items: list[CorpusItem], raw: dict[str, list[GeneratedQuery]], *,
                   config: QueryGenConfig) -> tuple[list[GeneratedQuery], Counter]:
    """Clean, drop degenerate generations and per-item (near-)duplicates; corpus order is kept."""
    kept: list[GeneratedQuery] = []
    dropped: Counter = Counter()
    for it in items:
        dedup = NearDuplicateFilter(method=config.dedup_method, threshold=config.dedup_threshold,
                                    ngram=config.dedup_ngram)
        for q in raw.get(it.item_id, []):
            text = clean_query(q.query)
            reason = degenerate_reason(text, prompt=q.prompt, min_words=config.min_words,
                                       max_token_run=config.max_token_run,
                                       min_unique_ratio=config.min_unique_ratio) or dedup.check(text)
            if reason:
                dropped[reason] += 1
            else:
                kept.append(GeneratedQuery(it.item_id, text, q.source, q.prompt))
    return kept, dropped


def write_dataset(queries: list[GeneratedQuery], out_dir: Path, fmt: str = "arrow") -> Path:
    """Hugging Face ``datasets`` dataset with columns item_id, query, source (Arrow folder or JSONL file)."""
    from datasets import Dataset, Features, Value

    features = Features({"item_id": Value("string"), "query": Value("string"), "source": Value("string")})
    ds = Dataset.from_dict({"item_id": [q.item_id for q in queries], "query": [q.query for q in queries],
                            "source": [q.source for q in queries]}, features=features)
    if fmt == "jsonl":
        path = out_dir / "queries.jsonl"
        ds.to_json(str(path), lines=True, force_ascii=False)
    else:
        path = out_dir / "dataset"
        ds.save_to_disk(str(path))
    return path


def run_querygen(items: list[CorpusItem], backend: QueryBackend, *, config: QueryGenConfig,
                 out_dir: str | Path) -> QueryGenSummary:
    """Generate (cached, resumable), filter, dedup and write ``out_dir``/dataset; returns the summary."""
    if not items:
        raise QueryGenError("the corpus has no items")
    dup = [k for k, n in Counter(it.item_id for it in items).items() if n > 1]
    if dup:
        raise QueryGenError(f"duplicate item ids in the corpus (e.g. {dup[:3]}); item ids must be unique")
    if config.num_threads is not None:
        import torch

        torch.set_num_threads(config.num_threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = QueryCache(config.cache_file or out_dir / "cache.jsonl", backend=backend.name,
                       fingerprint=backend.fingerprint())
    t0 = time.perf_counter()
    raw, failures, from_cache = generate_all(items, backend, config=config, cache=cache,
                                             failures_path=out_dir / "failures.jsonl")
    seconds = time.perf_counter() - t0
    generated = len(raw) - from_cache
    if not raw:
        raise QueryGenError(
            f"every item failed ({len(failures)}); e.g. {failures[0].item_id}: {failures[0].reason}"
            if failures else "no items were processed")
    pending = len(items) - len(raw) - len({f.item_id for f in failures})
    kept, dropped = filter_queries(items, raw, config=config)
    per_item = Counter(q.item_id for q in kept)
    counts = [per_item.get(it.item_id, 0) for it in items if it.item_id in raw]
    with_q = [c for c in counts if c]
    summary = QueryGenSummary(
        backend=backend.name, items=len(items), items_from_cache=from_cache, items_generated=generated,
        items_failed=len(failures), items_pending=pending, items_with_queries=len(with_q),
        raw_queries=sum(len(v) for v in raw.values()), queries=len(kept), dropped=dict(dropped),
        queries_per_item={"mean": sum(with_q) / len(with_q) if with_q else 0.0,
                          "min": min(with_q, default=0), "max": max(with_q, default=0)},
        seconds=seconds, items_per_second=(generated + len(failures)) / seconds if seconds > 0 else 0.0,
        generated_tokens=backend.stats.generated_tokens,
        tokens_per_second=backend.stats.generated_tokens / seconds if seconds > 0 else 0.0,
        failures=[asdict(f) for f in failures[:50]],
    )
    if not kept:
        raise QueryGenError(f"no usable query survived filtering (dropped: {dict(dropped)}); "
                            f"raw generations are kept in {cache.path}")
    summary.dataset_path = str(write_dataset(kept, out_dir, config.output_format))
    (out_dir / "summary.json").write_text(json.dumps({"summary": asdict(summary), "config": to_dict(config)},
                                                     indent=2, ensure_ascii=False))
    return summary
