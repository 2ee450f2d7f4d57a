"""Serving replicas in step: a background thread per server that applies other replicas' item changes
and swaps in a new model after ``train.py fold``.

Every ``poll_interval_s`` (``store.poll_interval_s`` in the serve config, 0.2 s by default) the thread
reads the item store's change sequence; when another process (a replica, the items CLI, a fold) has
committed since, it applies those rows (``Retriever.refresh``), so an add or delete acknowledged by one
replica is in every other replica's search results within a poll or two. A replica that starts late
loads everything from the store and then follows the same way.

When the store's fold marker (written by ``train.py fold`` in the transaction that marks the items
folded) names a model this replica does not serve, it reloads: the new model, identifiers and items are
loaded beside the serving ones, which keep answering searches, then swapped in at once
(``reload_retriever``). One replica of a run reloads at a time (``store.reload_slot()``: an advisory lock
on PostgreSQL, RUN/reload.lock on SQLite); the others try again at their next poll.

    sync = ReplicaSync(retriever, interval_s=0.2)
    sync.start()   # ... sync.stop()
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("ace.serving.replica")


def model_outdated(retriever) -> bool:
    """True when the store's fold marker names another model than the one the retriever serves."""
    fold = retriever.catalog.store_fold
    return fold is not None and fold != retriever.model_fold


def reload_retriever(retriever) -> str | None:
    """Load the run again (model, identifiers, fallback, items) beside the serving state, then swap it in under
    the retriever's state lock: no search is dropped, each is answered by the old or the new model whole.
    Returns the new model version."""
    if retriever.run_dir is None:
        raise ValueError("this retriever was not loaded from a run folder: nothing to reload")
    new = type(retriever).from_run(retriever.run_dir, **retriever._load_args)
    with retriever._state:
        old = retriever.catalog
        old.retired = True  # a write waiting on the old catalog retries on the new one
        for name in ("model", "query_tokenizer", "vocab", "id_tokenizer", "corpus", "fallback", "calibration",
                     "hybrid", "device", "model_fold", "model_version", "_trained_vectors"):
            setattr(retriever, name, getattr(new, name))
        retriever.catalog = new.catalog
        retriever.catalog.state, retriever.catalog.on_change = retriever._state, retriever.invalidate_tries
        retriever.invalidate_tries()
    old.close()
    log.info("%s: now serving model %s (fold %s)", retriever.run_dir, retriever.model_version, retriever.model_fold)
    return retriever.model_version


class ReplicaSync:
    """The background thread of one serving process: follow the item store, reload the model after a fold."""

    def __init__(self, retriever, *, interval_s: float = 0.2, reload_model: bool = True):
        if interval_s <= 0:
            raise ValueError(f"store.poll_interval_s must be > 0, got {interval_s}")
        self.retriever, self.interval_s, self.reload_model = retriever, float(interval_s), reload_model
        self.reloads = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def supported(retriever) -> bool:
        """Whether the retriever has an item store to follow (the server's test doubles do not)."""
        return hasattr(retriever, "refresh") and hasattr(retriever, "catalog")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ace-replica-sync", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def step(self) -> None:
        """One poll: apply new store changes; reload the model when a fold made it stale (and no other
        replica is reloading now)."""
        self.retriever.refresh()
        if self.reload_model and model_outdated(self.retriever):
            with self.retriever.catalog.open_store().reload_slot() as mine:
                if mine and model_outdated(self.retriever):
                    reload_retriever(self.retriever)
                    self.reloads += 1

    def _run(self) -> None:
        failing_since = None
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
                failing_since, self.last_error = None, None
            except Exception as exc:  # the store unreachable, a half-written model: keep serving, retry next poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                if failing_since is None or time.monotonic() - failing_since > 60:
                    log.warning("replica sync failed (retrying every %.1f s): %s", self.interval_s, self.last_error)
                    failing_since = time.monotonic()
