"""Fold items added after training into the generative model: ``python train.py fold --run RUN_DIR``.

Items added through the API (store source ``"added"``) are served by the fallback index. A fold
generates training queries for them with the run's querygen backend, fine-tunes the run's model
on those pairs plus a replay sample of the old training pairs, writes the new model and the
identifiers (now including the folded items, with the identifiers they got when they were added)
crash-safely, and marks the items ``"folded"`` in the store: from then on the generative path
serves them and they leave the fallback. A running server picks the new model up on restart.

    RUN/fold/<n>/plan.json        the items of this fold, fixed when it starts (a resumed fold reuses it)
    RUN/fold/<n>/queries/         querygen output; pairs.json the new (query, item_id) pairs
    RUN/fold/<n>/checkpoints/     fine-tuning checkpoints: a killed fold resumes where it stopped
    RUN/fold/<n>/before.json      recall before the fold; metrics.json + report.md when done
    RUN/model.prev/, RUN/identifiers.prev/   the previous model and identifiers

Commit protocol (``state.json`` records the phase): the new model and identifiers are written in
RUN/fold/<n>/ (phase ``staged``); phase ``swapping``; RUN/model -> RUN/model.prev and the staged
model -> RUN/model by rename (same for identifiers); phase ``swapped``; ``store.mark_folded``;
phase ``folded``; metrics; phase ``done``. A crash before ``swapping`` leaves the old model in
place (the next fold resumes from the checkpoints); a crash later is rolled forward by the next
``train.py fold``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ace.arrays import resolve_device
from ace.config import load_config, to_dict
from ace.metrics import retrieval_metrics
from ace.run_folder import (LockBusy, RunFolderError, RunPaths, read_pairs, run_media_root, take_lock,
                             write_json_atomic)

PHASES = ("planned", "staged", "swapping", "swapped", "folded", "done")
SWAPPED = (RunPaths.MODEL, RunPaths.IDENTIFIERS)


class FoldError(RuntimeError):
    """A fold cannot run: missing run folder or model, unusable items; the message says which."""


@dataclass
class FoldConfig:
    """Fine-tuning and evaluation settings of a fold (``key=value`` on the command line)."""
    steps: int = 500                  # fine-tuning steps
    replay_ratio: float = 1.0         # old training pairs replayed per new pair
    min_replay: int = 1000            # at least this many old pairs (all of them when fewer exist)
    batch_size: int | None = None     # None: the run's training.batch_size
    lr: float | None = None           # None: half the run's training.lr
    warmup_steps: int = 50
    omega: float | None = None        # R-Drop weight; None: the run's training.omega
    checkpoint_every: int = 100
    eval_queries: int = 2000          # held-out old-item queries scored before/after (0: none)
    test_queries: str | None = None   # JSON [[query, item_id], ...] held out for the added items;
                                      # None: RUN/added_test_queries.json when it exists
    num_beams: int = 10
    top_k: int = 10
    eval_batch_size: int = 100
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "num_beams", "top_k", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("replay_ratio", "min_replay", "warmup_steps", "eval_queries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.num_beams:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_beams ({self.num_beams})")


@dataclass
class FoldResult:
    """What a fold did: its folder, the folded items and the before/after metrics (None: nothing to fold)."""
    fold_dir: Path | None
    folded: list[str]
    metrics: dict | None
    message: str


# ----------------------------------------------------------------------------- run folder


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """A pairs file of the run or of a fold (none when absent), with fold's error type."""
    try:
        return read_pairs(path, missing_ok=True)
    except RunFolderError as exc:
        raise FoldError(str(exc)) from None


def _check_run(run: Path) -> None:
    if not run.is_dir():
        raise FoldError(f"run folder not found: {run}")
    needed = [RunPaths.CONFIG, *RunPaths.TRAINED]
    dirs = _fold_dirs(run)
    if dirs and _phase(dirs[-1][1]) == "swapping":  # a fold died between its renames: rolled forward below
        needed = [n for n in needed if n not in SWAPPED]
    missing = RunPaths(run).missing(needed)
    if missing:
        raise FoldError(f"{run} is not a trained run: missing {', '.join(missing)} "
                        f"(train it first: python train.py --config ... run_dir={run})")


def _fold_dirs(run: Path) -> list[tuple[int, Path]]:
    out = []
    for d in RunPaths(run).fold.glob("*"):
        if d.is_dir() and d.name.isdigit():
            out.append((int(d.name), d))
    return sorted(out)


def _phase(fold_dir: Path) -> str | None:
    path = fold_dir / "state.json"
    return json.loads(path.read_text())["phase"] if path.is_file() else None


def _set_phase(fold_dir: Path, phase: str, **info) -> None:
    write_json_atomic(fold_dir / "state.json", {"phase": phase, "time": time.time(), **info})


def _open_store(run: Path):
    from ace.serving.store import ItemStore

    return ItemStore(RunPaths(run).store) if RunPaths(run).store.is_file() else None


def _insert_identifiers(tok, codes: np.ndarray, item_ids: list[str]) -> None:
    """Put items with identifiers assigned earlier (at add time) into ``tok``, unchanged."""
    try:
        tok.restore(codes, item_ids)
    except ValueError as exc:  # TrieError / IdentifierInputError / IdTableError
        raise FoldError(f"cannot restore the identifiers of the added items: {exc}") from None


# ----------------------------------------------------------------------------- evaluation


def _recall(search, pairs: list[tuple[str, str]], k: int, num_beams: int, batch_size: int) -> dict | None:
    """retrieval_metrics of one search path on (query, item_id) pairs; None when there are none."""
    if not pairs:
        return None
    hits = search([q for q, _ in pairs], k=k, num_beams=num_beams, batch_size=batch_size)
    rankings = [[h.item_id for h in row] for row in hits]
    return {**retrieval_metrics(rankings, [t for _, t in pairs]), "queries": len(pairs)}


def evaluate_paths(run: Path, old_pairs, new_pairs, cfg: FoldConfig, device: str, *, folded: bool) -> dict:
    """R@k of the old items (generative path, merged search) and of the new ones: before the fold
    through the fallback path, after it through the generative path (and merged search both times)."""
    from ace.serving.retriever import Retriever

    retriever = Retriever.from_run(run, device=device)
    kw = dict(k=cfg.top_k, num_beams=cfg.num_beams, batch_size=cfg.eval_batch_size)

    def fallback(queries, k, num_beams, batch_size):
        return retriever.search_fallback(queries, k=k)

    new_path = ("new_generative", retriever.search_generative) if folded else ("new_fallback", fallback)
    try:
        return {"old_generative": _recall(retriever.search_generative, old_pairs, **kw),
                "old_merged": _recall(retriever.search, old_pairs, **kw),
                new_path[0]: _recall(new_path[1], new_pairs, **kw),
                "new_merged": _recall(retriever.search, new_pairs, **kw)}
    finally:
        retriever.close()


# ----------------------------------------------------------------------------- the fold


class Fold:
    """One fold of a run's added items: plan -> queries -> fine-tune -> stage -> swap -> mark -> report."""

    def __init__(self, run_dir: str | Path, cfg: FoldConfig | None = None):
        from ace.pipeline.run_config import RunConfig

        self.run = Path(run_dir)
        self.paths = RunPaths(self.run)
        _check_run(self.run)
        self.cfg = cfg or FoldConfig()
        self.run_cfg = load_config(RunConfig, self.paths.config)
        self.device = resolve_device(self.cfg.device, error=FoldError)
        if self.cfg.test_queries and not Path(self.cfg.test_queries).is_file():
            raise FoldError(f"test_queries file not found: {self.cfg.test_queries}")

    # ---- planning ----------------------------------------------------------------------------
    def _current(self) -> Path | None:
        """The latest fold folder when it is unfinished (to resume or roll forward)."""
        dirs = _fold_dirs(self.run)
        if dirs and _phase(dirs[-1][1]) != "done":
            return dirs[-1][1]
        return None

    def _plan(self, store) -> Path | None:
        """A new fold folder with plan.json listing the active added items; None when there are none."""
        items = store.list_active(source="added") if store is not None else []
        if not items:
            return None
        no_id = [it.item_id for it in items if it.identifier is None]
        if no_id:
            raise FoldError(f"added item(s) without an identifier in the store: {no_id[:5]}; "
                            f"items must get their identifier when they are added")
        dirs = _fold_dirs(self.run)
        fold_dir = self.paths.fold / str(dirs[-1][0] + 1 if dirs else 1)
        fold_dir.mkdir(parents=True)
        write_json_atomic(fold_dir / "plan.json", {
            "items": [it.item_id for it in items], "identifiers": [list(it.identifier) for it in items],
            "config": to_dict(self.cfg), "created": time.time()})
        _set_phase(fold_dir, "planned")
        return fold_dir

    # ---- data --------------------------------------------------------------------------------
    def _new_pairs(self, fold_dir: Path, store, item_ids: list[str]) -> list[tuple[str, str]]:
        """Generated (query, item_id) pairs for the fold's items (cached in the fold folder)."""
        path = fold_dir / "pairs.json"
        if path.is_file():
            return _read_pairs(path)
        from querygen import QueryGenError, build_backend, run_querygen

        root = run_media_root(self.run)
        qcfg = dataclasses.replace(self.run_cfg.querygen, media_root=self.run_cfg.querygen.media_root or root,
                                   cache_file=None, limit=None)
        items = [store.get(i).to_corpus_item() for i in item_ids]
        try:
            summary = run_querygen(items, build_backend(qcfg), config=qcfg, out_dir=fold_dir / "queries")
        except QueryGenError as exc:
            raise FoldError(f"query generation for the added items failed: {exc}") from None
        from ace.pipeline.stages import _read_query_dataset

        pairs = _read_query_dataset(Path(summary.dataset_path))
        write_json_atomic(path, pairs)
        return pairs

    def _replay_pool(self, active) -> list[tuple[str, str]]:
        """Old training pairs of live items: the run's, plus those of earlier folds."""
        pool = _read_pairs(self.paths.train_queries)
        for _, d in _fold_dirs(self.run):
            if _phase(d) == "done":
                pool += _read_pairs(d / "pairs.json")
        return [p for p in pool if active(p[1])]

    def _held_out(self, active, fold_items: set[str]) -> tuple[list, list]:
        """(old-item, new-item) held-out (query, item_id) pairs, old ones subsampled to eval_queries."""
        old = _read_pairs(self.paths.test_queries)
        for _, d in _fold_dirs(self.run):
            if _phase(d) == "done":
                old += _read_pairs(d / "test_pairs.json")
        old = [p for p in old if active(p[1]) and p[1] not in fold_items]
        if len(old) > self.cfg.eval_queries:
            keep = np.random.default_rng(self.cfg.seed).permutation(len(old))[:self.cfg.eval_queries]
            old = [old[i] for i in sorted(keep)]
        src = Path(self.cfg.test_queries) if self.cfg.test_queries else self.run / "added_test_queries.json"
        new = [p for p in _read_pairs(src) if p[1] in fold_items]
        return old, new

    # ---- training ----------------------------------------------------------------------------
    def _train_config(self):
        t = self.run_cfg.training
        return dataclasses.replace(
            t, max_steps=self.cfg.steps, warmup_steps=min(self.cfg.warmup_steps, self.cfg.steps),
            lr=self.cfg.lr if self.cfg.lr is not None else 0.5 * t.lr,
            batch_size=self.cfg.batch_size or t.batch_size,
            omega=self.cfg.omega if self.cfg.omega is not None else t.omega,
            checkpoint_every=self.cfg.checkpoint_every, eval_every=0, seed=self.cfg.seed,
            progress=self.cfg.progress)

    def _fine_tune(self, fold_dir: Path, tok, pairs: list[tuple[str, str]]) -> dict:
        """Fine-tune RUN/model on ``pairs``; the model lands in fold_dir/model (resumes from checkpoints)."""
        import torch

        from ace.model.modeling import AceModel
        from ace.model.tokens import IdentifierVocab, QueryTokenizer
        from ace.training.loop import train_retriever

        torch.manual_seed(self.cfg.seed)
        model = AceModel.from_pretrained(str(self.paths.model)).to(self.device)
        qtok = QueryTokenizer.load(self.paths.query_tokenizer)
        vocab = IdentifierVocab.load(self.paths.identifier_vocab)
        result = train_retriever(model, qtok, tok, vocab, pairs, None, self._train_config(), fold_dir, resume=True)
        return {"steps": result.step, "seconds": result.seconds}

    # ---- commit ------------------------------------------------------------------------------
    def _swap_in(self, fold_dir: Path) -> None:
        """RUN/<name> -> RUN/<name>.prev, staged fold_dir/<name> -> RUN/<name>; idempotent (roll forward)."""
        for name in SWAPPED:
            staged, live, prev = fold_dir / name, self.run / name, self.run / f"{name}.prev"
            if not staged.exists():
                continue  # already moved in
            if live.exists():
                if prev.exists():
                    shutil.rmtree(prev)
                live.rename(prev)
            staged.rename(live)

    # ---- driver ------------------------------------------------------------------------------
    def run_fold(self) -> FoldResult:
        """Fold the active added items (or finish an interrupted fold); one fold at a time per run."""
        self.paths.fold.mkdir(exist_ok=True)
        try:
            lock = take_lock(self.paths.fold / "LOCK")
        except LockBusy:
            raise FoldError(f"another fold of {self.run} is running (lock {self.paths.fold / 'LOCK'})") from None
        with lock:
            return self._run_locked()

    def _run_locked(self) -> FoldResult:
        store = _open_store(self.run)
        try:
            fold_dir = self._current()
            if fold_dir is not None and _phase(fold_dir) == "planned":
                plan = json.loads((fold_dir / "plan.json").read_text())
                live = {it.item_id for it in store.list_active(source="added")} if store is not None else set()
                if set(plan["items"]) != live:
                    print(f"[fold] {fold_dir.name}: the added items changed since this fold started; starting afresh")
                    shutil.rmtree(fold_dir)
                    fold_dir = None
                else:
                    print(f"[fold] resuming fold {fold_dir.name}")
            if fold_dir is None:
                fold_dir = self._plan(store)
                if fold_dir is None:
                    msg = f"nothing to fold: no active items with source 'added' in {self.run / 'store.sqlite'}"
                    return FoldResult(None, [], None, msg)
                print(f"[fold] fold {fold_dir.name} in {fold_dir}")
            return self._advance(fold_dir, store)
        finally:
            if store is not None:
                store.close()

    def _advance(self, fold_dir: Path, store) -> FoldResult:
        from identifiers import SemanticIdTokenizer

        plan = json.loads((fold_dir / "plan.json").read_text())
        items = plan["items"]
        phase = _phase(fold_dir)
        deleted = store.deleted_ids() if store is not None else set()

        def active(item_id: str) -> bool:
            return item_id not in deleted

        if phase == "planned":
            old_pairs, new_pairs = self._held_out(active, set(items))
            write_json_atomic(fold_dir / "test_pairs.json", new_pairs)
            if not (fold_dir / "before.json").is_file():
                print(f"[fold] recall before: {len(old_pairs)} old-item, {len(new_pairs)} new-item held-out queries")
                write_json_atomic(fold_dir / "before.json", evaluate_paths(self.run, old_pairs, new_pairs, self.cfg, self.device, folded=False))
            pairs = self._new_pairs(fold_dir, store, items)
            got = {i for _, i in pairs}
            items = [i for i in items if i in got]  # items without a usable query stay in the fallback
            if not items:
                raise FoldError("no added item got a usable training query; nothing can be folded")
            tok = SemanticIdTokenizer.load(self.paths.identifiers, device="cpu")
            codes = np.asarray([plan["identifiers"][plan["items"].index(i)] for i in items], dtype=np.int64)
            _insert_identifiers(tok, codes, items)
            pool = self._replay_pool(active)
            n_replay = min(len(pool), max(self.cfg.min_replay, int(round(self.cfg.replay_ratio * len(pairs)))))
            pick = np.random.default_rng(self.cfg.seed).permutation(len(pool))[:n_replay]
            replay = [pool[i] for i in sorted(pick)]
            print(f"[fold] {len(items)} items, {len(pairs)} new pairs + {len(replay)} replayed old pairs, "
                  f"{self.cfg.steps} steps")
            train_info = self._fine_tune(fold_dir, tok, pairs + replay)
            if (fold_dir / "identifiers").exists():
                shutil.rmtree(fold_dir / "identifiers")
            tok.save(fold_dir / "identifiers")
            _set_phase(fold_dir, "staged", items=items, new_pairs=len(pairs), replay_pairs=len(replay), **train_info)
            phase = "staged"
        record = json.loads((fold_dir / "state.json").read_text())
        items = record.get("items", items)
        if phase in ("staged", "swapping"):
            _set_phase(fold_dir, "swapping", **_info(record))
            self._swap_in(fold_dir)
            _set_phase(fold_dir, "swapped", **_info(record))
            shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)  # the model is committed: optimizer state is dead weight
            phase = "swapped"
        if phase == "swapped":
            # items deleted meanwhile stay deleted; after a crash some may already be folded
            live = [i for i in items if store.status(i) == "active" and store.get(i).source == "added"]
            n = store.mark_folded(live)
            print(f"[fold] {n} items marked folded; the generative path serves them now")
            _set_phase(fold_dir, "folded", **_info(record))
            phase = "folded"
        if phase == "folded":
            metrics = self._report(fold_dir, active, items, record)
            _set_phase(fold_dir, "done", **_info(record))
            return FoldResult(fold_dir, items, metrics, f"folded {len(items)} items (fold {fold_dir.name})")
        raise FoldError(f"{fold_dir}/state.json has an unknown phase {phase!r}; expected one of {PHASES}")

    def _report(self, fold_dir: Path, active, items: list[str], record: dict) -> dict:
        old_pairs, _ = self._held_out(active, set(items))
        new_pairs = _read_pairs(fold_dir / "test_pairs.json")
        before = json.loads((fold_dir / "before.json").read_text())
        after = evaluate_paths(self.run, old_pairs, new_pairs, self.cfg, self.device, folded=True)
        metrics = {"fold": int(fold_dir.name), "items": len(items), "new_pairs": record.get("new_pairs"),
                   "replay_pairs": record.get("replay_pairs"), "steps": record.get("steps"),
                   "train_seconds": record.get("seconds"), "before": before, "after": after,
                   "config": to_dict(self.cfg)}
        write_json_atomic(fold_dir / "metrics.json", metrics)
        (fold_dir / "report.md").write_text(format_report(metrics))
        print(format_report(metrics))
        return metrics


def _info(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("phase", "time")}


def format_report(m: dict) -> str:
    """Markdown report of one fold: recall of each path before and after."""
    rows = [("old items, generative path", "old_generative"), ("old items, merged search", "old_merged"),
            ("new items, fallback path", "new_fallback"), ("new items, generative path", "new_generative"),
            ("new items, merged search", "new_merged")]

    def cell(d, key):
        r = d.get(key)
        return "-" if r is None else f"{r['R@1']:.1f} / {r['R@10']:.1f}"

    lines = [f"# Fold {m['fold']}", "",
             f"{m['items']} items folded: {m['new_pairs']} new pairs + {m['replay_pairs']} replayed old pairs, "
             f"{m['steps']} fine-tuning steps ({(m['train_seconds'] or 0):.0f} s).", "",
             "| R@1 / R@10 on held-out queries | before | after | queries |", "| --- | --- | --- | --- |"]
    for label, key in rows:
        q = (m["after"].get(key) or m["before"].get(key) or {}).get("queries", 0)
        lines.append(f"| {label} | {cell(m['before'], key)} | {cell(m['after'], key)} | {q} |")
    lines += ["", "Before the fold the new items are in the fallback index (the generative path cannot return them); "
              "after it they are in the generative path and leave the fallback. Old-item recall before vs after "
              "measures forgetting. A running server serves the new model after a restart.", ""]
    return "\n".join(lines)


def fold_run(run_dir: str | Path, cfg: FoldConfig | None = None) -> FoldResult:
    """Fold the run's active added items into its generative model (see the module docstring)."""
    return Fold(run_dir, cfg).run_fold()
