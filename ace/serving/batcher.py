"""Micro-batching for the HTTP server: concurrent searches gathered into batches run by one worker thread.

Each ``POST /search`` puts its query on a pending list; one worker task takes up to ``max_batch``
pending queries (waiting at most ``max_wait_ms`` after the oldest arrived for others to join) and
answers them in a single worker thread. A query's key is ``(k, modality, beams, *shared)``: queries
whose ``shared`` parts agree (anything the retriever cannot mix in one call) share one
``search_fn(queries, keys)`` call whatever their k, modality and beams, so mixed traffic forms as few
model calls as uniform traffic. ``SearchKeys`` builds the keys for a retriever and the arguments of its
call: a retriever that takes one k / beam width / modality per query (``mixed_beam_search``,
``mixed_modality_search``) gets one call per micro-batch (it decodes each query with its own beam
width, so a k=20 query never widens another's beams); for others the beam width (and the modality)
are shared parts.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger("ace.serving.batcher")


class ServerBusy(Exception):
    """More searches are queued than ``max_queue``."""


@dataclass
class _Pending:
    query: str
    key: tuple                    # (k, modality, beams, *shared): one search_fn call per distinct key[3:]
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStats:
    batches: int = 0
    queries: int = 0
    max_size: int = 0
    calls: int = 0                # search_fn calls (one per distinct key[3:] per batch)


class MicroBatcher:
    """Gathers concurrent searches into batches run by one worker thread."""

    def __init__(self, search_fn: Callable[[list[str], list[tuple]], list[Any]], *, max_batch: int,
                 max_wait_ms: float, max_queue: int):
        self.search_fn = search_fn
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.stats = BatchStats()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ace-search")
        self._task = asyncio.create_task(self._worker(), name="ace-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(ServerBusy("server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, query: str, key: tuple) -> Any:
        if not self.alive:
            raise ServerBusy("search worker is not running")
        if len(self._pending) >= self.max_queue:
            raise ServerBusy(f"{len(self._pending)} searches queued (max_queue={self.max_queue})")
        loop = asyncio.get_running_loop()
        pending = _Pending(query, key, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._event.set()
        return await pending.future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._event.clear()
                await self._event.wait()
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [p for p in batch if not p.future.done()]  # clients that gave up
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # _run_batch catches per group; this is a bug guard, not a fallback
                log.exception("micro-batch failed")
                outcomes = [exc] * len(batch)
            for p, out in zip(batch, outcomes):
                if p.future.done():
                    continue
                if isinstance(out, BaseException):
                    p.future.set_exception(out)
                else:
                    p.future.set_result(out)

    def _run_batch(self, batch: list[_Pending]) -> list[Any]:
        """Runs in the worker thread. Pending queries whose keys agree beyond their own (k, modality, beams)
        - ``key[3:]`` - share one ``search_fn`` call (see ``SearchKeys``). A failing call is retried query
        by query, so one bad query fails alone."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(p.key[3:], []).append(i)
        outcomes: list[Any] = [None] * len(batch)
        for idx in groups.values():
            try:
                results = self._call([batch[i].query for i in idx], [batch[i].key for i in idx])
                for i, r in zip(idx, results):
                    outcomes[i] = r
            except Exception as exc:
                if len(idx) == 1:
                    outcomes[idx[0]] = exc
                    continue
                for i in idx:  # isolate the query that made the batch fail
                    try:
                        outcomes[i] = self._call([batch[i].query], [batch[i].key])[0]
                    except Exception as single_exc:
                        outcomes[i] = single_exc
        self.stats.batches += 1
        self.stats.queries += len(batch)
        self.stats.max_size = max(self.stats.max_size, len(batch))
        return outcomes

    def _call(self, queries: list[str], keys: list[tuple]) -> list[Any]:
        self.stats.calls += 1
        results = self.search_fn(queries, keys)
        if len(results) != len(queries):
            raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
        return results


class SearchKeys:
    """Micro-batch keys ``(k, modality, beams, width, modality filter, mode)`` for a retriever's searches, and
    the ``retriever.search`` arguments of a group of them. What the retriever cannot mix in one call is
    shared: the beam width ``max(beams or its default, k)`` unless it takes one k and beam width per query
    (``mixed_beam_search``), the modality unless it takes one filter per query (``mixed_modality_search``),
    always the search mode."""

    def __init__(self, retriever: Any):
        self.mixed_beams = getattr(retriever, "mixed_beam_search", False)
        self.mixed_modalities = getattr(retriever, "mixed_modality_search", False)
        self.default_beams = getattr(retriever, "default_beams", None)

    def key(self, k: int, modality: str | None, beams: int | None, mode: str | None) -> tuple:
        width = max(beams or self.default_beams, k) if self.default_beams else beams
        return (k, modality, beams, None if self.mixed_beams else width,
                None if self.mixed_modalities else modality, mode)

    def call_args(self, keys: list[tuple]) -> dict:
        """One ``retriever.search`` for queries of these keys: one value where all agree, else one per query
        (non-mixing retrievers: the largest k and the group's width; each result is cut to its own k)."""
        def one(values):
            return values[0] if len(set(values)) == 1 else values

        ks, mods, beams = [key[0] for key in keys], [key[1] for key in keys], [key[2] for key in keys]
        k, num_beams = (one(ks), one(beams)) if self.mixed_beams else (max(ks), keys[0][3])
        mode = keys[0][5]
        return {"k": k, "num_beams": num_beams, "modality": one(mods), **({"mode": mode} if mode else {})}


class LatencyStats:
    """Counts of served/failed searches and the latencies (ms) of the most recent ``window``."""

    def __init__(self, window: int):
        self.values: collections.deque[float] = collections.deque(maxlen=window)
        self.served = self.failed = 0

    def add(self, ms: float) -> None:
        self.served += 1
        self.values.append(ms)

    def summary(self) -> dict:
        if not self.values:
            return {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None}
        v = np.fromiter(self.values, dtype=np.float64)
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return {"count": int(v.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
                "p99": round(float(p99), 3), "mean": round(float(v.mean()), 3)}
