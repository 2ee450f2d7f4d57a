"""Fold items added after training into the generative model: ``python train.py fold --run RUN_DIR``.

Items added through the API (store source ``"added"``) are served by the fallback index. A fold
generates training queries for them with the run's querygen backend, holds some out for validation
(``val_per_item``), fine-tunes the run's current model (the previous fold's, when there was one) on
the rest plus a structured replay sample of old training pairs (ace/pipeline/fold_gate.py), with a
KL term that keeps its next-token distributions on the replayed pairs close to the previous model's
(``distill_weight``; a frozen encoder stays frozen: only the decoder and identifier embeddings move;
prototype heads get the new items' prefixes). The gate then compares, per new item, its generative
recall after fine-tuning with its fallback recall before, on its validation queries: items below stay
in the fallback (still served there); the model is swapped in only when old-item recall on validation
queries drops by less than ``max_old_drop``. The new model and the identifiers (with the folded
items, under the identifiers they got when added) are committed crash-safely and the folded items
marked ``"folded"`` in the store with the fold marker: running servers reload it (ace/serving/replica.py).

    RUN/fold/<n>/plan.json        the items of this fold, fixed when it starts (a resumed fold reuses it)
    RUN/fold/<n>/queries/         querygen output; pairs.json the new (query, item_id) pairs
    RUN/fold/<n>/checkpoints/     fine-tuning checkpoints: a killed fold resumes where it stopped
    RUN/fold/<n>/split.json       new pairs split into training / validation, the replay sample, old validation
    RUN/fold/<n>/before.json      held-out test recall before the fold; gate.json the gate's measurements and decision
    RUN/fold/<n>/metrics.json + report.md when done; RUN/fold_report.json the latest fold's
    RUN/model.prev/, RUN/identifiers.prev/   the previous model and identifiers
    RUN/model/folded_offsets.json  on a hybrid run: the folded items' log-prob offsets (``calibrate``: fitted
                                   by the gate, ``fold_gate.cross_fit_offset``), earlier folds' items included

Commit protocol (``state.json`` records the phase): the new model and identifiers are written in
RUN/fold/<n>/ (phase ``staged``); phase ``swapping``; RUN/model -> RUN/model.prev and the staged
model and RUN/model exchange places atomically (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
renames), then the old one moves to RUN/model.prev (same for identifiers); phase ``swapped``;
``store.mark_folded``; phase ``folded``; metrics; phase ``done``. At every point RUN/model and
RUN/identifiers exist and every live item is served (folded items only once marked; until then by the
fallback). A crash before ``swapping`` leaves the old model in place (the next fold resumes from the
checkpoints); a crash later is rolled forward by the next ``train.py fold``. A gate refusal stages
nothing: phase ``staged`` with no items, then the report.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ace.arrays import resolve_device
from ace.config import load_config, to_dict
from ace.pipeline import fold_gate
from ace.pipeline.fold_config import FoldConfig
from ace.pipeline.fold_measure import evaluate_paths, format_report, gate_after, gate_before
from ace.pipeline.fold_train import FoldTrainingError, fine_tune
from ace.run_folder import (LockBusy, RunFolderError, RunPaths, load_run_embeddings, read_pairs, run_media_root,
                            take_lock, write_json_atomic)

PHASES = ("planned", "staged", "swapping", "swapped", "folded", "done")
SWAPPED = (RunPaths.MODEL, RunPaths.IDENTIFIERS)
TAG = "FOLD"   # file in a staged model / identifiers folder naming its fold (tells whether it is swapped in)


class FoldError(RuntimeError):
    """A fold cannot run: missing run folder or model, unusable items; the message says which."""


@dataclass
class FoldResult:
    """What a fold did: its folder, the folded items and the before/after metrics (None: nothing to fold)."""
    fold_dir: Path | None
    folded: list[str]
    metrics: dict | None
    message: str
    stayed: list[str] = dataclasses.field(default_factory=list)   # candidates left in the fallback


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
    from ace.serving.store import open_run_store

    return open_run_store(run)  # $ACE_STORE_URL, else RUN/store.sqlite; None if a SQLite one was never written


def _insert_identifiers(tok, codes: np.ndarray, item_ids: list[str]) -> None:
    """Put items with identifiers assigned earlier (at add time) into ``tok``, unchanged."""
    try:
        tok.restore(codes, item_ids)
    except ValueError as exc:  # TrieError / IdentifierInputError / IdTableError
        raise FoldError(f"cannot restore the identifiers of the added items: {exc}") from None


def _tag(folder: Path) -> str | None:
    path = folder / TAG
    return path.read_text().strip() if path.is_file() else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2`` with RENAME_EXCHANGE); False when the
    system or file system cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fingerprint(model_dir: Path) -> str:
    """sha256 of a saved model's weight files (which model a fold started from)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the fold


class Fold:
    """One fold of a run's added items: plan -> queries -> fine-tune -> gate -> stage -> swap -> mark -> report."""

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
        if self.cfg.old_bar == "auto":   # as served where the run serves merged search by one score
            served = self.paths.hybrid_scorer.is_file() and self.cfg.gate_path == "served"
            self.cfg = dataclasses.replace(self.cfg, old_bar="served" if served else "unshared")
        if self.cfg.old_bar == "served" and not self.paths.hybrid_scorer.is_file():
            # checked here, before the fold's held-out "before" evaluation, not only when the gate needs it
            raise FoldError(f"old_bar=served measures old items through merged search as served: it needs a hybrid "
                            f"run (RUN/hybrid/scorer.json), and {self.run} has none; use old_bar=unshared")

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
            "config": to_dict(self.cfg), "created": time.time(), "base_model": _fingerprint(self.paths.model)})
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

        pairs = [(q, i) for q, i, _ in _read_query_dataset(Path(summary.dataset_path))]
        write_json_atomic(path, pairs)
        return pairs

    def _replay_pool(self, on_path) -> list[tuple[str, str]]:
        """Old training pairs of the items on the generative path: the run's, plus those of earlier folds."""
        pool = _read_pairs(self.paths.train_queries)
        for _, d in _fold_dirs(self.run):
            if _phase(d) == "done":
                pool += _read_pairs(d / "pairs.json")
        return [p for p in pool if on_path(p[1])]

    def _held_out(self, active, fold_items: set[str]) -> tuple[list, list]:
        """(old-item, new-item) held-out test (query, item_id) pairs, old ones subsampled to eval_queries."""
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

    def _split(self, fold_dir: Path, pairs, tok, on_path, plan: dict, store) -> dict:
        """Training / validation pairs of the new items, the replay sample, the old validation pairs
        (fixed in split.json when first computed, so that a resumed fold trains on the same pairs)."""
        path = fold_dir / "split.json"
        if path.is_file():
            return {k: ([tuple(p) for p in v] if isinstance(v, list) else v) for k, v in json.loads(path.read_text()).items()}
        scorer = [tuple(p) for p in _read_pairs(self.paths.scorer_queries)]
        documents = {i: store.get(i).to_corpus_item().description() for i in {i for _, i in pairs}}
        out = fold_gate.make_split(pairs, self._replay_pool(on_path), scorer, tok, plan["identifiers"], self.cfg, on_path,
                                   documents=documents)
        write_json_atomic(path, out)
        return out

    # ---- commit ------------------------------------------------------------------------------
    def _swap_in(self, fold_dir: Path) -> None:
        """Staged fold_dir/<name> -> RUN/<name>, the old one -> RUN/<name>.prev; idempotent (roll forward).
        RUN/<name> never goes missing where the system can exchange two folders atomically."""
        for name in SWAPPED:
            staged, live, prev = fold_dir / name, self.run / name, self.run / f"{name}.prev"
            if _tag(live) != fold_dir.name:   # not swapped in yet
                if not staged.exists():
                    raise FoldError(f"{staged} is missing: fold {fold_dir.name} cannot be finished")
                if not live.exists():
                    staged.rename(live)
                elif not _exchange(staged, live):   # two renames: a crash between them is rolled forward
                    if prev.exists():
                        shutil.rmtree(prev)
                    live.rename(prev)
                    staged.rename(live)
            if staged.exists():   # the previous one, after an exchange
                if prev.exists():
                    shutil.rmtree(prev)
                staged.rename(prev)

    def _stage_offsets(self, fold_dir: Path, folded: list[str], calibration: dict | None) -> None:
        """The staged model's folded_offsets.json: the live model's (earlier folds' items) + this fold's offset
        for the items it folds (none on the generative path, or when it fitted 0)."""
        from ace.newitems.hybrid import HybridError, offsets_document, read_offsets

        try:
            offsets, folds = read_offsets(self.paths.folded_offsets, folds=True)
        except HybridError as exc:
            raise FoldError(str(exc)) from None
        if calibration is not None:
            offsets.update({i: calibration["offset"] for i in folded if calibration["offset"] != 0})
            folds[fold_dir.name] = {k: calibration[k] for k in ("offset", "half_offsets", "grid")} | {"items": len(folded)}
        if offsets or folds:
            write_json_atomic(fold_dir / RunPaths.MODEL / RunPaths.FOLDED_OFFSETS, offsets_document(offsets, folds))

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
                    msg = f"nothing to fold: no active items with source 'added' in the item store of {self.run}"
                    return FoldResult(None, [], None, msg)
                print(f"[fold] fold {fold_dir.name} in {fold_dir}")
            return self._advance(fold_dir, store)
        finally:
            if store is not None:
                store.close()

    def _train_and_stage(self, fold_dir: Path, store, plan: dict, active) -> dict:
        """Phase ``planned`` -> ``staged``: queries, split, fine-tuning, gate, staged model + identifiers."""
        from identifiers import SemanticIdTokenizer

        items = plan["items"]
        old_test, new_test = self._held_out(active, set(items))
        write_json_atomic(fold_dir / "test_pairs.json", new_test)
        if not (fold_dir / "before.json").is_file():
            print(f"[fold] recall before: {len(old_test)} old-item, {len(new_test)} new-item held-out queries")
            write_json_atomic(fold_dir / "before.json",
                              evaluate_paths(self.run, old_test, new_test, self.cfg, self.device, folded=None))
        pairs = self._new_pairs(fold_dir, store, items)
        got = {i for _, i in pairs}
        items = [i for i in items if i in got]  # items without a usable query stay in the fallback
        if not items:
            raise FoldError("no added item got a usable training query; nothing can be folded")
        tok = SemanticIdTokenizer.load(self.paths.identifiers, device="cpu")
        old_ids = set(tok.item_ids)

        def on_path(iid: str) -> bool:   # old items on the generative path
            return iid in old_ids and active(iid)

        old_rows = [r for r, iid in enumerate(tok.item_ids) if on_path(iid)]
        codes = np.asarray([plan["identifiers"][plan["items"].index(i)] for i in items], dtype=np.int64)
        _insert_identifiers(tok, codes, items)
        split = self._split(fold_dir, [p for p in pairs if p[1] in set(items)], tok, on_path, plan, store)
        def items_of(ids: list[str]) -> list:   # added / folded items: their texts give their hybrid vectors
            return [store.get(i).to_corpus_item() for i in ids]

        before = gate_before(self.run, fold_dir, self.cfg, self.device, split, tok, old_rows, items, items_of)
        row = {iid: i for i, iid in enumerate(tok.item_ids)}
        print(f"[fold] {len(items)} items, {len(split['train_new'])} new pairs ({len(split['val_new'])} held out for "
              f"the gate) + {len(split['replay'])} replayed old pairs ({self.cfg.replay}), {self.cfg.steps} steps, "
              f"distill_weight {self.cfg.distill_weight}")
        try:
            train_info = fine_tune(self.run, self.run_cfg, self.cfg, self.device, fold_dir, tok, split,
                                   old_rows + [row[i] for i in items], store)
        except FoldTrainingError as exc:
            raise FoldError(str(exc)) from None
        decision = gate_after(self.run, fold_dir, self.cfg, self.device, tok, split, old_rows, items, before, items_of)
        folded = decision["folded"]
        print(f"[fold] gate: {'swap' if decision['swap'] else 'no swap'} ({decision['why']}); "
              f"{len(folded)} folded, {len(decision['stayed'])} stay in the fallback")
        for name in SWAPPED:
            if (fold_dir / name).exists() and (not folded or name == RunPaths.IDENTIFIERS):
                shutil.rmtree(fold_dir / name)
        if folded:   # identifiers: the current ones + the folded items only
            self._stage_offsets(fold_dir, folded, decision.get("calibration"))
            staged = SemanticIdTokenizer.load(self.paths.identifiers, device="cpu")
            _insert_identifiers(staged, np.asarray([plan["identifiers"][plan["items"].index(i)] for i in folded],
                                                   dtype=np.int64), folded)
            staged.save(fold_dir / RunPaths.IDENTIFIERS)
            for name in SWAPPED:
                (fold_dir / name / TAG).write_text(fold_dir.name)
        shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)  # the model is staged: optimizer state is dead weight
        n = len(items)
        cost = {"items": n, "folded": len(folded), "steps_per_item": train_info["steps"] / n,
                "seconds_per_item": train_info["seconds"] / n,
                "steps_per_folded_item": train_info["steps"] / len(folded) if folded else None,
                "seconds_per_folded_item": train_info["seconds"] / len(folded) if folded else None}
        no_query = [i for i in plan["items"] if i not in got]   # no usable query: stay in the fallback too
        return {"items": folded, "stayed": decision["stayed"] + no_query, "candidates": items, "new_pairs": len(split["train_new"]),
                "val_pairs": len(split["val_new"]), "replay_pairs": len(split["replay"]),
                "replay_info": split["replay_info"], "cost": cost, "swap": decision["swap"], **train_info}

    def _advance(self, fold_dir: Path, store) -> FoldResult:
        plan = json.loads((fold_dir / "plan.json").read_text())
        phase = _phase(fold_dir)
        deleted = store.deleted_ids() if store is not None else set()

        def active(item_id: str) -> bool:
            return item_id not in deleted

        if phase == "planned":
            _set_phase(fold_dir, "staged", **self._train_and_stage(fold_dir, store, plan, active))
            phase = "staged"
        record = json.loads((fold_dir / "state.json").read_text())
        items = record.get("items", [])
        if phase in ("staged", "swapping") and items:
            _set_phase(fold_dir, "swapping", **_info(record))
            self._swap_in(fold_dir)
            _set_phase(fold_dir, "swapped", **_info(record))
            phase = "swapped"
        elif phase == "staged":
            phase = "folded"   # the gate refused: nothing to swap or mark
        if phase == "swapped":
            # items deleted meanwhile stay deleted; after a crash some may already be folded
            live = [i for i in items if store.status(i) == "active" and store.get(i).source == "added"]
            n = store.mark_folded(live, fold=int(fold_dir.name))  # + the fold marker: running servers reload
            print(f"[fold] {n} items marked folded; the generative path serves them now")
            _set_phase(fold_dir, "folded", **_info(record))
            phase = "folded"
        if phase == "folded":
            metrics = self._report(fold_dir, active, record)
            _set_phase(fold_dir, "done", **_info(record))
            stayed = record.get("stayed", [])
            msg = (f"folded {len(items)} items (fold {fold_dir.name})" + (f"; {len(stayed)} stay in the fallback" if stayed else "")
                   if items else f"fold {fold_dir.name}: nothing swapped in ({metrics['gate']['why']}); "
                                 f"{len(stayed)} items stay in the fallback")
            return FoldResult(fold_dir, items, metrics, msg, stayed)
        raise FoldError(f"{fold_dir}/state.json has an unknown phase {phase!r}; expected one of {PHASES}")

    def _report(self, fold_dir: Path, active, record: dict) -> dict:
        items = record.get("items", [])
        candidates = record.get("candidates", items)
        old_pairs, _ = self._held_out(active, set(candidates))
        new_pairs = _read_pairs(fold_dir / "test_pairs.json")
        before = json.loads((fold_dir / "before.json").read_text())
        mine = set(items)
        for key, out in (("new_fallback_rankings", "folded_fallback"), ("new_merged_rankings", "folded_merged")):
            sub = [(r, p) for r, p in zip(before.pop(key, []), new_pairs) if p[1] in mine]
            before[out] = fold_gate.metrics([r for r, _ in sub], [p for _, p in sub]) if sub else None
        after = evaluate_paths(self.run, old_pairs, new_pairs, self.cfg, self.device, folded=items)
        gate = json.loads((fold_dir / "gate.json").read_text())
        metrics = {"fold": int(fold_dir.name), "items": len(items), "folded": items, "stayed": record.get("stayed", []),
                   "candidates": len(candidates), "new_pairs": record.get("new_pairs"),
                   "val_pairs": record.get("val_pairs"), "replay_pairs": record.get("replay_pairs"),
                   "replay_info": record.get("replay_info"), "steps": record.get("steps"),
                   "train_seconds": record.get("seconds"), "cost": record.get("cost"),
                   "frozen_encoder": record.get("frozen_encoder"),
                   "base_model": json.loads((fold_dir / "plan.json").read_text()).get("base_model"),
                   "before": before, "after": after, "gate": gate, "config": to_dict(self.cfg)}
        write_json_atomic(fold_dir / "metrics.json", metrics)
        write_json_atomic(self.paths.fold_report, metrics)
        (fold_dir / "report.md").write_text(format_report(metrics))
        print(format_report(metrics))
        return metrics


def _info(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("phase", "time")}


def swapped_fold(run_dir: str | Path, fold: int | None = None) -> tuple[Path, dict, dict, FoldConfig]:
    """(fold folder, state.json, plan.json, the FoldConfig it ran with) of fold ``fold`` of a run (default: the
    latest), which must be finished with items swapped in (for the diagnostics that re-measure a fold)."""
    dirs = dict(_fold_dirs(Path(run_dir)))
    if not dirs or (fold is not None and fold not in dirs):
        raise FoldError(f"{run_dir} has no fold {fold if fold is not None else ''}".rstrip())
    fold_dir = dirs[fold if fold is not None else max(dirs)]
    state = json.loads((fold_dir / "state.json").read_text())
    if state.get("phase") != "done" or not state.get("items"):
        raise FoldError(f"{fold_dir}: not a finished fold that swapped items in (phase {state.get('phase')})")
    plan = json.loads((fold_dir / "plan.json").read_text())
    cfg = FoldConfig(**{k: v for k, v in plan["config"].items() if k in FoldConfig.__dataclass_fields__})
    return fold_dir, state, plan, cfg


def fold_run(run_dir: str | Path, cfg: FoldConfig | None = None) -> FoldResult:
    """Fold the run's active added items into its generative model (see the module docstring)."""
    return Fold(run_dir, cfg).run_fold()
