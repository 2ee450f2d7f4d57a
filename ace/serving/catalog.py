"""The item lifecycle of a loaded run: the items added, folded and deleted after training.

``ItemCatalog`` owns RUN/store.sqlite (``ItemStore``), the run's writer lock (RUN/store.lock: one
writing process per run), validation of new items, their embedding (given, or the run's encoder on
a media file inside the corpus root), identifier assignment, and add/delete. ``Retriever`` keeps
model loading and search, and delegates ``add_items`` / ``delete_items`` / ``item`` here; both
share one re-entrant lock (searches vs adds/deletes: deletes shift trie rows).

Every add/delete batch is one SQLite transaction, committed before the call returns and before the
in-memory indexes change: acknowledged = durable.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ace.data.corpus import Corpus, CorpusItem, resolve_media_file
from ace.newitems.index import FallbackIndex
from ace.run_folder import LockBusy, RunPaths, read_encoder_config, take_lock
from ace.serving.errors import ItemConflictError, ItemNotFoundError, RetrieverError, WriterLockError
from ace.serving.store import ItemStore, StoreError, check_item
from identifiers import SemanticIdTokenizer


class ItemCatalog:
    """The live item set beyond the trained model: stored (added + folded) items, deleted ids, the item
    store and its writer lock. ``modality`` maps every live item id (trained, added, folded) to its
    modality; ``on_change`` is called after identifiers were removed (the retriever drops its tries)."""

    def __init__(self, *, corpus: Corpus, id_tokenizer: SemanticIdTokenizer, fallback: FallbackIndex | None,
                 run_dir: Path | None, state: threading.RLock, on_change: Callable[[], None]):
        self.corpus, self.id_tokenizer, self.fallback, self.run_dir = corpus, id_tokenizer, fallback, run_dir
        self.state = state
        self.on_change = on_change
        self.modality: dict[str, str] = {it.item_id: it.modality for it in corpus.items}
        self.stored: dict[str, CorpusItem] = {}      # active added + folded items (not in the corpus file)
        self.deleted: set[str] = set()
        self._store: ItemStore | None = None
        self._writer_lock = None                     # open lock file while this process writes the run's items
        self._encoder = None

    def load_store(self) -> None:
        """Rebuild identifiers, tries and the fallback index from every row of RUN/store.sqlite."""
        store = self.open_store()
        rows = list(store.iterate(status=None))
        tok = self.id_tokenizer
        restore = [r for r in rows if r.identifier is not None and r.source != "trained"]
        for r in [r for r in restore if r.item_id in tok.trie]:  # e.g. folded items saved with RUN/identifiers
            if tuple(int(c) for c in tok.codes_of([r.item_id])[0]) != tuple(r.identifier):
                raise RetrieverError(f"item {r.item_id!r}: identifier {r.identifier} in store.sqlite differs from "
                                     f"RUN/identifiers {tok.codes_of([r.item_id])[0].tolist()}")
        restore = [r for r in restore if r.item_id not in tok.trie]
        if restore:
            tok.restore(np.asarray([r.identifier for r in restore], dtype=np.int64), [r.item_id for r in restore])
        self.deleted = {r.item_id for r in rows if r.status == "deleted"}
        gone = [i for i in self.deleted if i in tok.trie]
        if gone:
            tok.remove(gone)
        added = [r for r in rows if r.status == "active" and r.source == "added"]
        for r in rows:
            if r.status == "active" and r.source in ("added", "folded"):
                self.stored[r.item_id] = r.to_corpus_item()
                self.modality[r.item_id] = r.modality
        if added:
            if self.fallback is None:
                raise RetrieverError(f"{self.run_dir}: store.sqlite holds {len(added)} added items but the run has no "
                                     f"fallback index (RUN/fallback) to serve them")
            missing = [r.item_id for r in added if r.embedding is None]
            if missing:
                raise RetrieverError(f"store.sqlite: added items without an embedding: {missing[:5]}")
            self.fallback.add([r.item_id for r in added], np.stack([r.embedding for r in added]))
        self.on_change()

    def open_store(self) -> ItemStore:
        if self._store is None:
            if self.run_dir is None:
                raise RetrieverError("this retriever was not loaded from a run folder: it has no item store")
            self._store = ItemStore(RunPaths(self.run_dir).store)
        return self._store

    def writer(self) -> ItemStore:
        """The store, with this process holding the run's writer lock (one writing process per run)."""
        store = self.open_store()
        if self._writer_lock is None:
            try:
                self._writer_lock = take_lock(RunPaths(self.run_dir).store_lock)
            except LockBusy as exc:
                raise WriterLockError(f"another process (pid {exc.holder}) is writing the items of {self.run_dir}; "
                                      f"stop it, or send the change to its HTTP API") from None
        return store

    def close(self) -> None:
        """Release the item store and the writer lock."""
        with self.state:
            if self._writer_lock is not None:
                self._writer_lock.close()  # closing the file drops the flock
                self._writer_lock = None
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
            except StoreError as exc:
                raise RetrieverError(str(exc)) from None
            if it.item_id in seen:
                raise ItemConflictError(f"item id {it.item_id!r} appears twice in one batch")
            seen.add(it.item_id)
            if it.embedding is None and not it.media:
                raise RetrieverError(f"item {it.item_id!r}: give an embedding or a media file")
        self.check_ids_free([it.item_id for it in items])

    def check_ids_free(self, ids) -> None:
        taken = [i for i in ids if i in self.modality or i in self.deleted or i in self.id_tokenizer.trie]
        if taken:
            raise ItemConflictError(f"item id(s) already used in this run (trained, added or deleted; ids are never "
                                    f"reused): {', '.join(map(repr, taken[:5]))}{' ...' if len(taken) > 5 else ''}")

    def embed(self, items: Sequence[CorpusItem]) -> np.ndarray:
        """(N, D) float32: the given embeddings, or the run's encoder on the media files (inside the corpus root)."""
        dim = self.id_tokenizer.dim
        out = np.zeros((len(items), dim), dtype=np.float32)
        todo = []
        for n, it in enumerate(items):
            if it.media is not None:
                self.check_media(it)
            if it.embedding is None:
                todo.append(n)
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
            emb = self.encode_media([items[n] for n in todo])
            if emb.shape != (len(todo), dim):
                raise RetrieverError(f"the run's encoder gives {emb.shape[1]}-d vectors, the run's identifiers "
                                     f"are {dim}-d (set encoder.dim in the run's config)")
            out[todo] = emb
        return out

    def check_media(self, item: CorpusItem) -> None:
        """The item's media file exists and lies inside the corpus root (symlinks resolved)."""
        root = self.corpus.root
        if root is None:
            raise RetrieverError(f"item {item.item_id!r}: this run has no corpus root, so media files cannot be "
                                 f"resolved; give an embedding and no media")
        try:
            path = resolve_media_file(str(item.media), root)
        except PermissionError:
            raise RetrieverError(f"item {item.item_id!r}: media path {item.media!r} is outside the corpus root") from None
        if not path.is_file():
            raise RetrieverError(f"item {item.item_id!r}: media file not found: {item.media!r} (under {root})")

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
        with self.state:
            store = self.writer()
            ids = [it.item_id for it in items]
            self.check_ids_free(ids)  # again: another request may have added them meanwhile
            codes = self.id_tokenizer.assign(emb, ids)
            stored = [CorpusItem(it.item_id, it.modality, media=it.media, embedding=e, captions=list(it.captions),
                                 metadata=dict(it.metadata)) for it, e in zip(items, emb)]
            try:
                store.add(stored, identifiers=codes, source="added")
            except BaseException:
                self.id_tokenizer.remove(ids)  # nothing committed: forget the identifiers
                raise
            self.fallback.add(ids, emb)  # validated above; the store already holds the items
            # the generative tries are unchanged: added rows are appended to the identifier trie, never decoded
            for it in stored:
                self.stored[it.item_id] = it
                self.modality[it.item_id] = it.modality
        return [tuple(int(c) for c in row) for row in codes]

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
            gone = [i for i in ids if i in self.deleted]
            if gone:
                raise ItemNotFoundError(f"item id(s) already deleted: {', '.join(map(repr, gone[:5]))}")
            unknown = [i for i in ids if not isinstance(i, str) or i not in self.modality]
            if unknown:
                raise ItemNotFoundError(f"unknown item id(s): {', '.join(map(repr, unknown[:5]))}")
            tok = self.id_tokenizer
            trained = [(self.corpus.get(i), tok.codes_of([i])[0] if i in tok.trie else None)
                       for i in ids if i not in self.stored]
            self.writer().delete(ids, trained=trained)
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
            self.on_change()
        return len(ids)

    def item(self, item_id: str) -> CorpusItem:
        if item_id in self.deleted:
            raise ItemNotFoundError(f"item {item_id!r} was deleted")
        if item_id in self.stored:
            return self.stored[item_id]
        try:
            return self.corpus.get(item_id)
        except (KeyError, ValueError):
            raise ItemNotFoundError(f"unknown item id {item_id!r}") from None

    def is_deleted(self, item_id: str) -> bool:
        return item_id in self.deleted
