"""The item lifecycle of a loaded run: the items added, folded and deleted after training.

``ItemCatalog`` owns the run's item store (``store.url``: RUN/store.sqlite by default, or a PostgreSQL
database shared by serving replicas), the SQLite writer lock (RUN/store.lock, held for one write at a
time, so a running server and the items CLI take turns), validation of new items
(``ace/validation.py``), their embedding (given, or the run's encoder on a media file inside the
corpus root or the run's uploads), identifier assignment, add/delete, and the quarantine of stored
rows that cannot be served. ``Retriever`` keeps
model loading and search, and delegates ``add_items`` / ``delete_items`` / ``item`` here; both
share one re-entrant lock (searches vs adds/deletes: deletes shift trie rows).

Every add/delete batch is one store transaction, committed before the call returns and before the
in-memory indexes change: acknowledged = durable. Each write transaction first takes the store's write
lock (its change-sequence row), then catches up with what other processes committed since this one
last read the store (``changes(since)``), so identifiers are always assigned from the current table;
``refresh()`` (called by the server's replica sync, ``ace/serving/replica.py``) catches up between
writes, so another process's writes show here within one poll interval.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ace.data.corpus import MODALITIES, Corpus, CorpusItem
from ace.newitems.index import FallbackIndex
from ace.run_folder import LockBusy, RunPaths, read_encoder_config, take_lock
from ace.serving.errors import ItemConflictError, ItemNotFoundError, RetrieverError, WriterLockError
from ace.serving.media import MediaPathError, resolve_item_media
from ace.serving.store import (BaseItemStore, IdentifierConflictError, StoreError, check_item, open_item_store,
                               store_exists)
from ace.validation import InputError, check_item_fields
from identifiers import SemanticIdTokenizer

log = logging.getLogger("ace.serving.catalog")


class CatalogRetired(RuntimeError):
    """A model reload replaced this catalog while a write waited: the retriever retries on the new one."""


class ItemCatalog:
    """The live item set beyond the trained model: stored (added + folded) items, deleted ids, the item
    store and its writer lock. ``modality`` maps every live item id (trained, added, folded) to its
    modality; ``on_change`` is called after identifiers were removed (the retriever drops its tries)."""

    def __init__(self, *, corpus: Corpus, id_tokenizer: SemanticIdTokenizer, fallback: FallbackIndex | None,
                 run_dir: Path | None, state: threading.RLock, on_change: Callable[[], None],
                 store_url: str | None = None):
        self.corpus, self.id_tokenizer, self.fallback, self.run_dir = corpus, id_tokenizer, fallback, run_dir
        self.store_url = store_url                   # None: no item store (a retriever not loaded from a run)
        self.state = state
        self.on_change = on_change
        self.modality: dict[str, str] = {it.item_id: it.modality for it in corpus.items}
        self.stored: dict[str, CorpusItem] = {}      # active added + folded items (not in the corpus file)
        self.deleted: set[str] = set()
        self.quarantined: dict[str, str] = {}        # stored rows that cannot be served: item id -> why
        self.lock_timeout_s = 10.0                   # how long a write waits for another process's write
        self.write_retries = 3                       # identifier conflicts (a stale view) retried this often
        self.cursor = 0                              # every store change up to this change sequence is applied
        self.store_fold: int | None = None           # the store's model_fold marker when last read
        self.retired = False                         # a model reload replaced this catalog: writes go to the new one
        self._store: BaseItemStore | None = None
        self._encoder = None

    def has_store(self) -> bool:
        """Whether the run has an item store to read (a SQLite file appears with the first write)."""
        return self._store is not None or (self.store_url is not None and store_exists(self.store_url))

    def load_store(self) -> None:
        """Rebuild identifiers, tries and the fallback index from every row of the item store. A row that
        cannot be served (undecodable, invalid fields, an identifier that clashes) is quarantined: logged,
        reported by ``quarantine_report()`` (and /stats), kept in the store untouched, its id never reused."""
        store = self.open_store()
        self.store_fold = store.state()["model_fold"]
        self.sync(store)

    def refresh(self) -> bool:
        """Catch up with what other processes committed since this one last read the store (one cheap read
        when nothing changed); True when something was applied. The replica sync calls this every poll."""
        if not self.has_store():
            return False
        store = self.open_store()
        state = store.state()
        self.store_fold = state["model_fold"]
        if state["change_seq"] <= self.cursor:
            return False
        with self.state:
            if self.retired:
                return False
            self.sync(store)
        return True

    def sync(self, store: BaseItemStore) -> None:
        """Bring the in-memory state up to the store's rows changed since ``cursor``: rows this process has not
        seen are restored (or quarantined), items another process deleted are dropped. At load, before each
        write (inside its transaction, so nothing else commits meanwhile) and on ``refresh``."""
        errors: list[tuple[str, str]] = []
        top = store.visible_seq()  # read first: rows committed after it are read again next time (idempotent)
        rows = list(store.changes(self.cursor, errors=errors))
        for item_id, reason in errors:
            self._quarantine(item_id, reason)
        tok = self.id_tokenizer
        serve, restore = [], []
        changed = False
        for r in rows:
            i = r.item_id
            if i in self.quarantined:
                if r.status == "deleted":  # another process deleted a quarantined row: nothing left to report
                    self.quarantined.pop(i, None)
                    self.deleted.add(i)
                continue
            if r.status == "deleted":
                if i not in self.deleted:
                    self._forget([i])
                    changed = True
                continue
            if r.source not in ("added", "folded") or i in self.stored:
                continue  # trained rows are tombstones; stored items are served already
            reason = self._unservable(r)
            if reason is not None:
                self._quarantine(i, reason)
                continue
            if i in tok.trie:  # e.g. folded items saved with RUN/identifiers
                have = tuple(int(c) for c in tok.codes_of([i])[0])
                if have != tuple(r.identifier):
                    self._quarantine(i, f"identifier {list(r.identifier)} in the item store differs from "
                                        f"RUN/identifiers {list(have)}")
                    continue
                serve.append(r)
            else:
                restore.append(r)
        serve += self._restore(restore)
        added = [r for r in serve if r.source == "added"]
        if added:
            if self.fallback is None:
                raise RetrieverError(f"{self.run_dir}: the item store holds {len(added)} added items but the run has no "
                                     f"fallback index (RUN/fallback) to serve them")
            self.fallback.add([r.item_id for r in added], np.stack([r.embedding for r in added]))
        for r in serve:
            self.stored[r.item_id] = r.to_corpus_item()
            self.modality[r.item_id] = r.modality
        if changed or serve:
            self.on_change()
        self.cursor = top

    def _unservable(self, r) -> str | None:
        """Why a stored active added/folded row cannot be served, or None."""
        try:
            check_item_fields(r.item_id, media=r.media, captions=r.captions, metadata=r.metadata)
        except InputError as exc:
            return str(exc)
        if r.modality not in MODALITIES:
            return f"modality {r.modality!r} is not one of {MODALITIES}"
        if r.identifier is None or len(r.identifier) != self.id_tokenizer.length:
            return f"identifier {r.identifier!r} does not have {self.id_tokenizer.length} levels"
        if r.source == "added":
            if r.embedding is None:
                return "an added item without an embedding"
            emb = np.asarray(r.embedding)
            if emb.shape != (self.id_tokenizer.dim,) or not np.isfinite(emb).all() or not np.abs(emb).sum():
                return f"embedding of shape {emb.shape} is not a finite non-zero {self.id_tokenizer.dim}-d vector"
        return None

    def _restore(self, rows: list) -> list:
        """Re-insert stored identifiers (one batch; on a clash row by row, quarantining the rows that fail)."""
        if not rows:
            return []
        tok = self.id_tokenizer
        try:
            tok.restore(np.asarray([r.identifier for r in rows], dtype=np.int64), [r.item_id for r in rows])
            return rows
        except ValueError:  # TrieError / IdentifierInputError: isolate the rows at fault
            pass
        ok = []
        for r in rows:
            try:
                tok.restore(np.asarray([r.identifier], dtype=np.int64), [r.item_id])
                ok.append(r)
            except ValueError as exc:
                self._quarantine(r.item_id, f"identifier {list(r.identifier)} cannot be restored: {exc}")
        return ok

    def _quarantine(self, item_id: str, reason: str) -> None:
        if item_id not in self.quarantined:
            log.warning("item store of %s: item %r quarantined (not served): %s", self.run_dir, item_id, reason)
        self.quarantined[item_id] = reason

    def quarantine_report(self, limit: int = 20) -> dict:
        """Rows of the item store that are not served: their count and the first ``limit`` (id, reason)."""
        return {"count": len(self.quarantined),
                "items": [{"item_id": i.encode("utf-8", "backslashreplace").decode("utf-8"), "reason": why}
                          for i, why in list(self.quarantined.items())[:limit]]}

    def store_info(self) -> dict:
        """The store's backend and the change sequence applied here (no URL: it may hold a password)."""
        backend = None
        if self.store_url is not None:
            backend = "sqlite" if self.store_url.lower().startswith("sqlite:") else "postgresql"
        return {"backend": backend, "change_seq": self.cursor, "model_fold": self.store_fold}

    def _forget(self, ids: list[str]) -> None:
        """Drop deleted items from every in-memory index (the store already marks them deleted)."""
        tok = self.id_tokenizer
        in_fb = [i for i in ids if self.fallback is not None and i in self.fallback]
        if in_fb:
            self.fallback.remove(in_fb)
        in_tok = [i for i in ids if i in tok.trie]
        if in_tok:
            tok.remove(in_tok)
        self.deleted.update(ids)
        for i in ids:
            self.stored.pop(i, None)
            self.modality.pop(i, None)

    def open_store(self) -> BaseItemStore:
        if self._store is None:
            if self.store_url is None:
                raise RetrieverError("this retriever was not loaded from a run folder: it has no item store")
            try:
                self._store = open_item_store(self.store_url)
            except StoreError as exc:
                raise RetrieverError(str(exc)) from None
        return self._store

    # ---- the writer lock -----------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """One write transaction on the store, caught up: the store's write lock is taken first (the change-
        sequence row; for SQLite also the flock on RUN/store.lock, so a running server and the items CLI take
        turns), then the rows other processes committed since this one last read the store are applied, so
        identifiers are assigned from the current table. Committed when the block ends. Waits up to
        ``lock_timeout_s`` for another local writer, then WriterLockError."""
        store = self.open_store()
        with self._local_lock(store), store.transaction():
            self.sync(store)
            yield store
        self.cursor = max(self.cursor, store.last_commit_seq or 0)

    def _local_lock(self, store: BaseItemStore):
        """The flock of a SQLite store's folder (RUN/store.lock); none for a database server's store."""
        if store.backend != "sqlite":
            return contextlib.nullcontext()
        path = RunPaths(store.path.parent).store_lock
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                return take_lock(path)  # closing the file drops the flock
            except LockBusy as exc:
                if time.monotonic() >= deadline:
                    raise WriterLockError(f"another process (pid {exc.holder}) has been writing the items of "
                                          f"{self.run_dir} for over {self.lock_timeout_s:g} s; try again later, "
                                          f"or send the change to the running server's HTTP API") from None
                time.sleep(0.005)

    def close(self) -> None:
        """Release the item store and the writer lock."""
        with self.state:
            if self._store is not None:
                self._store.close()
                self._store = None

    def check_new_items(self, items: Sequence[CorpusItem]) -> None:
        if isinstance(items, CorpusItem) or not isinstance(items, (list, tuple)):
            raise RetrieverError("add_items() takes a list of CorpusItem")
        if not items:
            raise RetrieverError("add_items() got no items")
        seen: set[str] = set()
        for n, it in enumerate(items):
            if not isinstance(it, CorpusItem):
                raise RetrieverError(f"item {n} is a {type(it).__name__}, not a CorpusItem")
            try:
                check_item(it)
                check_item_fields(it.item_id, media=it.media, captions=it.captions, metadata=it.metadata,
                                  prefix=f"items.{n}" if len(items) > 1 else "")
            except (StoreError, InputError) as exc:
                raise RetrieverError(str(exc)) from None
            if it.item_id in seen:
                raise ItemConflictError(f"item id {it.item_id!r} appears twice in one batch")
            seen.add(it.item_id)
            if it.embedding is None and not it.media:
                raise RetrieverError(f"item {it.item_id!r}: give an embedding or a media file")
        self.check_ids_free([it.item_id for it in items])

    def check_ids_free(self, ids) -> None:
        taken = [i for i in ids if i in self.modality or i in self.deleted or i in self.quarantined
                 or i in self.id_tokenizer.trie]
        if taken:
            raise ItemConflictError(f"item id(s) already used in this run (trained, added, deleted or quarantined; ids are never "
                                    f"reused): {', '.join(map(repr, taken[:5]))}{' ...' if len(taken) > 5 else ''}")

    def embed(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """(N, D) float32: the given embeddings, or the run's encoder on the media files (inside the corpus
        root, or the run's uploads)."""
        dim = self.id_tokenizer.dim
        out = np.zeros((len(items), dim), dtype=np.float32)
        todo = []
        for n, it in enumerate(items):
            path = self.check_media(it) if it.media is not None else None
            if it.embedding is None:
                todo.append(dataclasses.replace(it, media=str(path)))  # the encoder reads the resolved file
                continue
            vec = np.asarray(it.embedding, dtype=np.float32)
            if vec.ndim != 1 or vec.shape[0] != dim:
                raise RetrieverError(f"item {it.item_id!r}: embedding has shape {tuple(vec.shape)}, this run's "
                                     f"items are {dim}-d vectors")
            if not np.isfinite(vec).all():
                raise RetrieverError(f"item {it.item_id!r}: embedding contains NaN or infinite values")
            if np.linalg.norm(vec) < 1e-12:
                raise RetrieverError(f"item {it.item_id!r}: embedding is all zeros")
            out[n] = vec
        if todo:
            emb = self.encode_media(todo)
            if emb.shape != (len(todo), dim):
                raise RetrieverError(f"the run's encoder gives {emb.shape[1]}-d vectors, the run's identifiers "
                                     f"are {dim}-d (set encoder.dim in the run's config)")
            out[[n for n, it in enumerate(items) if it.embedding is None]] = emb
        return out

    def check_media(self, item: CorpusItem) -> Path:
        """The real path of the item's media file, which must exist inside the corpus root (or the run's
        uploads folder, for ``run:uploads/...``), symlinks resolved."""
        try:
            path = resolve_item_media(str(item.media), self.corpus.root, self.run_dir)
        except MediaPathError:
            raise RetrieverError(f"item {item.item_id!r}: media path {item.media!r} is outside the corpus root") from None
        except ValueError as exc:
            raise RetrieverError(f"item {item.item_id!r}: {exc}; give an embedding and no media") from None
        try:
            found = path.is_file()
        except OSError as exc:  # e.g. a path component longer than the file system allows
            raise RetrieverError(f"item {item.item_id!r}: media path {item.media!r} cannot be used: "
                                 f"{exc.strerror or exc}") from None
        if not found:
            raise RetrieverError(f"item {item.item_id!r}: media file not found: {item.media!r} (under "
                                 f"{'the run folder' if str(item.media).startswith('run:') else self.corpus.root})")
        return path

    def encode_media(self, items: list[CorpusItem]) -> np.ndarray:
        from ace.data.encoders import build_encoder

        if self._encoder is None:
            cfg = read_encoder_config(self.run_dir) if self.run_dir is not None else None
            if cfg is None:
                raise RetrieverError("this run has no encoder config (RUN/config.yaml): give embeddings, not media")
            self._encoder = build_encoder(cfg)
        kinds = {it.modality: getattr(self._encoder.cfg, it.modality).kind for it in items}
        pre = [m for m, kind in kinds.items() if kind == "precomputed"]
        if pre:
            raise RetrieverError(f"this run's {'/'.join(pre)} encoder is 'precomputed': it cannot encode media "
                                 f"files; give the item's embedding")
        try:
            return np.asarray(self._encoder.encode(items, root=self.corpus.root), dtype=np.float32)
        except (ValueError, OSError) as exc:  # EncoderError names the item
            raise RetrieverError(f"cannot encode media: {exc}") from None

    def add(self, items: Sequence[CorpusItem]) -> list[tuple[int, ...]]:
        """Validate, embed, assign identifiers, store durably (one transaction), add to the fallback index.

        Returns each item's identifier (k, v1..vM, u). Searchable as soon as this returns.
        """
        if self.fallback is None:
            raise RetrieverError("this run has no fallback index (RUN/fallback), so it cannot serve added items: "
                                 "run the pipeline's `fallback` stage (python train.py --config ...)")
        self.check_new_items(items)
        emb = self.embed(items)  # may run the encoder: outside the state lock
        ids = [it.item_id for it in items]
        stored = [CorpusItem(it.item_id, it.modality, media=it.media, embedding=e, captions=list(it.captions),
                             metadata=dict(it.metadata)) for it, e in zip(items, emb)]
        for attempt in range(self.write_retries):
            with self.state:
                self._check_live()
                assigned = False
                try:
                    with self.writing() as store:
                        self.check_ids_free(ids)  # again, caught up: another request or process may have added them
                        codes = self.id_tokenizer.assign(emb, ids)
                        assigned = True
                        store.add(stored, identifiers=codes, source="added")
                except IdentifierConflictError as exc:  # a stale view despite the catch-up: catch up again, retry
                    self.id_tokenizer.remove(ids)
                    log.warning("identifier conflict on add (attempt %d): %s", attempt + 1, exc)
                    continue
                except BaseException:
                    if assigned:
                        self.id_tokenizer.remove(ids)  # nothing committed: forget the identifiers
                    raise
                self.fallback.add(ids, emb)  # validated above; the store already holds the items
                # the generative tries are unchanged: added rows are appended to the identifier trie, never decoded
                for it in stored:
                    self.stored[it.item_id] = it
                    self.modality[it.item_id] = it.modality
                return [tuple(int(c) for c in row) for row in codes]
        raise WriterLockError(f"identifier conflicts with other writers {self.write_retries} times in a row; try again")

    def _check_live(self) -> None:
        if self.retired:
            raise CatalogRetired("the model was reloaded: this catalog was replaced")

    def delete(self, item_ids: Sequence[str]) -> int:
        """Delete items of any source, durably (one transaction); they are never returned again."""
        if isinstance(item_ids, str) or not isinstance(item_ids, (list, tuple)):
            raise RetrieverError("delete_items() takes a list of item ids")
        ids = list(item_ids)
        if not ids:
            raise RetrieverError("delete_items() got no item ids")
        if len(set(ids)) != len(ids):
            raise RetrieverError("duplicate item ids in one delete")
        with self.state:
            self._check_live()
            with self.writing() as store:  # caught up: another process may have deleted some
                trained = self._check_deletable(ids)
                store.delete(ids, trained=trained)
            self._forget(ids)
            for i in ids:
                self.quarantined.pop(i, None)  # a deleted row needs no quarantine
            self.on_change()
        return len(ids)

    def _check_deletable(self, ids: list[str]) -> list:
        """ItemNotFoundError for ids already deleted or unknown; the trained items among them with identifiers."""
        gone = [i for i in ids if i in self.deleted]
        if gone:
            raise ItemNotFoundError(f"item id(s) already deleted: {', '.join(map(repr, gone[:5]))}")
        unknown = [i for i in ids if not isinstance(i, str) or (i not in self.modality and i not in self.quarantined)]
        if unknown:
            raise ItemNotFoundError(f"unknown item id(s): {', '.join(map(repr, unknown[:5]))}")
        tok = self.id_tokenizer
        return [(self.corpus.get(i), tok.codes_of([i])[0] if i in tok.trie else None)
                for i in ids if i not in self.stored and i not in self.quarantined]

    def item(self, item_id: str) -> CorpusItem:
        if item_id in self.deleted:
            raise ItemNotFoundError(f"item {item_id!r} was deleted")
        if item_id in self.quarantined:
            raise ItemNotFoundError(f"item {item_id!r} is quarantined: its stored row cannot be served "
                                    f"({self.quarantined[item_id]})")
        if item_id in self.stored:
            return self.stored[item_id]
        try:
            return self.corpus.get(item_id)
        except (KeyError, ValueError):
            raise ItemNotFoundError(f"unknown item id {item_id!r}") from None

    def is_deleted(self, item_id: str) -> bool:
        return item_id in self.deleted
