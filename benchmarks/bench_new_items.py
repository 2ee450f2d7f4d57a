"""New items without retraining (issue 8): add 20% of a caption file to a run trained on the other 80%, then fold.

    OMP_NUM_THREADS=1 python benchmarks/bench_new_items.py ../shared/data/mscoco/mscoco_val.json \
        --config configs/mscoco_80_20.yaml

1. ``train.py --config CONFIG`` trains the run on the first ``corpus.limit`` items (80%). When the
   run's train stage is already done, only the stages after it (fallback, eval, report) run, with
   the recorded stage keys (see ``finish_trained_run``). The trained run is copied to ``--work`` so
   every benchmark run starts from the same state (the trained run itself is never modified).
2. Recall of the old items' held-out queries (generative path and merged search) before any add.
3. The other items are added through ``Retriever.add_items`` (the call behind ``POST /items``),
   in batches, with their non-test captions and their embedding from the run's encoder (MiniLM
   on caption 1; the caption-proxy media files do not exist, so no media path is given):
   identifiers are assigned, the store commits, the fallback index takes them. Items/s with and
   without the encoding.
4. R@10 on the new items' held-out queries through the fallback alone and through merged
   search, against the DT-trained baseline (ace/bench/baselines.py ``dt_trained``: frozen MiniLM +
   InfoNCE projection trained on every item's generated queries) over the same candidates;
   old items again (the generative path must be unchanged). Bytes per item of the index.
5. ``train.py fold --run WORK``; recall of both sets again (forgetting; new items via the
   generative path, or the fallback for the items the fold gate kept there).

``--folds N`` (issue 16) splits the added items into N equal parts: add a part, measure, fold it, measure,
then the next part (each fold starts from the previous one's model); every round is recorded
(``rounds``), with the fold's own report (gate decision, folded-item recall on the generative path vs
the fallback, cost per folded item).

Writes ``--out`` (JSON) and prints a Markdown summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ace.config import load_config  # noqa: E402
from ace.metrics import retrieval_metrics  # noqa: E402
from ace.pipeline.run_config import RunConfig  # noqa: E402
from ace.pipeline.stages import load_source_corpus, split_captions  # noqa: E402
from ace.run_folder import RunFolder, RunPaths, copy_trained_run, read_pairs  # noqa: E402


def _recall(hits, pairs) -> dict:
    return {**retrieval_metrics([[h.item_id for h in row] for row in hits], [t for _, t in pairs]),
            "queries": len(pairs)}


def _run(cmd: list[str], log: Path) -> float:
    """Run a command (output to ``log``); seconds taken. A failure stops the benchmark with its log tail."""
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.time() - t


def _measure(retriever, old, new, *, folded: bool, beams: int) -> dict:
    """Old items: generative path + merged search; new items: fallback (before) or generative (after) + merged."""
    out = {"old_generative": _recall(retriever.search_generative(
               [q for q, _ in old], k=10, num_beams=beams), old),
           "old_merged": _recall(retriever.search([q for q, _ in old], k=10, num_beams=beams), old)}
    if new:
        queries = [q for q, _ in new]
        if folded:
            out["new_generative"] = _recall(retriever.search_generative(queries, k=10, num_beams=beams), new)
        else:
            out["new_fallback"] = _recall(retriever.search_fallback(queries, k=10), new)
        out["new_merged"] = _recall(retriever.search(queries, k=10, num_beams=beams), new)
    return out


def dt_trained_reference(captions: str, new_ids: set[str], cache_dir: Path, seed: int) -> dict:
    """DT-trained R@10 on the new items' test queries: over the new items only, and over all items."""
    from ace.bench.baselines import dt_trained, encode_split, query_targets, search_topk
    from ace.data.encoders import MINILM, TextEncoder
    from ace.data.importers import load_proxy_split
    from ace.newitems.query_tower import QueryTowerConfig

    split = load_proxy_split(captions)
    encoder = TextEncoder(MINILM)
    emb = encode_split(split, encoder, cache_dir=cache_dir, encoder_name=MINILM)
    t = time.time()
    rankings, tower = dt_trained(split, emb, encoder, config=QueryTowerConfig(seed=seed, device="cpu"))
    fit_s = time.time() - t
    targets = query_targets(split)
    rows = [j for j, iid in enumerate(targets) if iid in new_ids]
    over_all = retrieval_metrics([rankings[j] for j in rows], [targets[j] for j in rows])
    cand = [i for i, iid in enumerate(split.item_ids) if iid in new_ids]
    q = tower.project(emb.test_queries[rows])
    docs = emb.documents[cand] / np.linalg.norm(emb.documents[cand], axis=1, keepdims=True)
    idx = search_topk(docs, q, 10)
    over_new = retrieval_metrics([[split.item_ids[cand[i]] for i in row if i >= 0] for row in idx.tolist()],
                                 [targets[j] for j in rows])
    return {"over_new_items": {**over_new, "queries": len(rows), "candidates": len(cand)},
            "over_all_items": {**over_all, "queries": len(rows), "candidates": len(split.item_ids)},
            "tower_fit_s": fit_s, "tower_train_pairs": len(split.train_queries)}


def finish_trained_run(cfg: RunConfig, *, evaluate: bool = True) -> bool:
    """When the run's train stage is done: run the stages after it (fallback, hybrid, eval, report) on that model;
    ``evaluate=False``: not the eval and report stages (the benchmark measures old items on its own queries).

    The recorded stage keys are used, so a config dataclass that gained a field since the run was
    trained (a new stage key) does not retrain it. False when the run is not trained yet.
    """
    from ace.pipeline.stages import Pipeline

    pipe = Pipeline(cfg, progress=False)
    for stage in ("corpus", "encode", "identifiers", "querygen", "train"):
        record = pipe.run.stage_record(stage)
        if record is None:
            return False
        pipe.keys[stage] = record["key"]
    pipe.stage_fallback()
    pipe.stage_hybrid()   # (eval's key includes the hybrid stage's: without it an up-to-date eval runs again)
    if evaluate:
        pipe.stage_eval()
        pipe.stage_report()
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("captions", help="caption file (the config's corpus.path is replaced by it)")
    ap.add_argument("--config", default="configs/mscoco_80_20.yaml")
    ap.add_argument("--work", default="benchmarks/out/new_items/work", help="copy of the trained run that gets the adds and the fold")
    ap.add_argument("--out", default="benchmarks/out/new_items/results.json")
    ap.add_argument("--old-queries", type=int, default=2000, help="old items' held-out queries scored (seeded sample)")
    ap.add_argument("--add-batch", type=int, default=100, help="items per add_items call")
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-fold", action="store_true")
    ap.add_argument("--folds", type=int, default=1, help="successive add + fold rounds over equal parts of the added items")
    ap.add_argument("--skip-dt", action="store_true", help="no DT-trained reference (saves its tower training)")
    ap.add_argument("--no-eval", action="store_true",
                    help="a trained run's eval stage is not run (it scores every held-out caption; on mscoco 80/20 ~17 min)")
    ap.add_argument("fold_overrides", nargs="*", help="key=value settings for train.py fold (e.g. steps=800)")
    args = ap.parse_intermixed_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out_path = ROOT / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logs = out_path.parent
    result: dict = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_avg_start": os.getloadavg()}}

    # 1. the trained run (80%) -------------------------------------------------------------------
    cfg = load_config(RunConfig, ROOT / args.config)
    override = [] if Path(cfg.corpus.path).resolve() == Path(args.captions).resolve() else [f"corpus.path={args.captions}"]
    cfg = load_config(RunConfig, ROOT / args.config, override)
    if not cfg.corpus.limit:
        sys.exit(f"{args.config}: set corpus.limit (the number of items trained on); the rest are added")
    run = ROOT / cfg.run_dir
    t = time.time()
    if not finish_trained_run(cfg, evaluate=not args.no_eval):
        until = ["--until", "hybrid"] if args.no_eval else []
        _run([sys.executable, "train.py", "--config", args.config, "--quiet", *until, *override], logs / "train.log")
    train_s = time.time() - t
    stages = {s: (RunFolder(run).stage_record(s) or {}).get("seconds")
              for s in ("train", "fallback") if RunFolder(run).stage_record(s) is not None}
    result["run"] = {"run_dir": str(run), "train_py_seconds_this_call": train_s, "stage_seconds": stages,
                     "metrics": (json.loads(RunPaths(run).metrics.read_text())["by_group"]["all"]
                                 if RunPaths(run).metrics.is_file() else None)}
    work = ROOT / args.work
    copy_trained_run(run, work)

    # the other items, split like the trained ones: non-test captions are added, test captions held out
    full = load_source_corpus(dataclasses.replace(cfg.corpus, path=args.captions, limit=None))
    new_items, new_test = split_captions(type(full)(items=full.items[cfg.corpus.limit:], root=full.root,
                                                    source=full.source), cfg.split)
    new_items = [dataclasses.replace(it, embedding=None) for it in new_items.items]
    old = read_pairs(RunPaths(work).test_queries)
    rng = np.random.default_rng(args.seed)
    old = [old[i] for i in sorted(rng.permutation(len(old))[:args.old_queries])]
    result["sizes"] = {"trained_items": cfg.corpus.limit, "added_items": len(new_items),
                       "old_queries": len(old), "new_queries": len(new_test)}
    print(json.dumps(result["sizes"]))

    from ace.serving.retriever import Retriever

    # 2. before any add ----------------------------------------------------------------------------
    r = Retriever.from_run(work, device="cpu")
    t = time.time()
    result["before_adds"] = _measure(r, old, [], folded=False, beams=args.beams)
    result["before_adds"]["seconds"] = time.time() - t

    # 3-5. rounds: add a part of the other items through the API, measure, fold, measure ---------
    # The caption-proxy "media" (COCO file names) are not on disk; the run's encoder embeds an item
    # from its first caption, so the benchmark runs that encoder itself and passes the embedding.
    from ace.data.encoders import build_encoder
    from ace.run_folder import read_encoder_config

    encoder = build_encoder(read_encoder_config(work))
    n_rounds = max(1, args.folds)
    bounds = np.linspace(0, len(new_items), n_rounds + 1).astype(int)
    result["rounds"] = []
    added_ids: list[str] = []
    for rnd in range(n_rounds):
        part = new_items[bounds[rnd]:bounds[rnd + 1]]
        ids = {it.item_id for it in part}
        part_test = [p for p in new_test if p[1] in ids]
        earlier = [p for p in new_test if p[1] in set(added_ids)]
        encode_s = add_s = 0.0
        for s in range(0, len(part), args.add_batch):
            batch = part[s:s + args.add_batch]
            t = time.time()
            emb = encoder.encode(batch)
            encode_s += time.time() - t
            t = time.time()
            r.add_items([dataclasses.replace(it, embedding=e, media=None) for it, e in zip(batch, emb)])
            add_s += time.time() - t
        added_ids += sorted(ids)
        store_bytes = sum(p.stat().st_size for p in work.glob(RunPaths.STORE + "*"))
        n = len(part)
        rec = {"round": rnd + 1, "adds": {
            "items": n, "batch": args.add_batch, "encode_seconds": encode_s, "add_seconds": add_s,
            "items_per_s_add_items": n / add_s, "items_per_s_with_encoding": n / (encode_s + add_s),
            "fallback_bytes_per_item": r.fallback.bytes_per_item(), "store_bytes_per_item": store_bytes / len(added_ids),
            "note": "add_items = identifier assign + SQLite commit (WAL, synchronous=FULL) + fallback "
                    "index add; encoding = the run's MiniLM encoder on the item's first caption"}}
        print(json.dumps(rec["adds"], default=str))
        t = time.time()
        rec["after_adds"] = _measure(r, old, part_test, folded=False, beams=args.beams)
        if earlier:   # items folded in earlier rounds (generative path unless the gate kept them)
            rec["after_adds"]["earlier_merged"] = _recall(r.search([q for q, _ in earlier], k=10, num_beams=args.beams), earlier)
        rec["after_adds"]["seconds"] = time.time() - t
        r.close()
        if rnd == 0 and not args.skip_dt:
            result["dt_trained"] = dt_trained_reference(args.captions, {it.item_id for it in new_items},
                                                        ROOT / "benchmarks" / "out" / "cache", args.seed)
        if not args.skip_fold:
            (work / "added_test_queries.json").write_text(json.dumps([list(p) for p in new_test if p[1] in set(added_ids)]))
            fold_cmd = [sys.executable, "train.py", "fold", "--run", str(work), "--quiet", *args.fold_overrides]
            rec["fold"] = {"command": " ".join(["python"] + fold_cmd[1:]),
                           "seconds": _run(fold_cmd, logs / f"fold{rnd + 1}.log")}
            metrics = json.loads(RunPaths(work).fold_report.read_text())
            rec["fold"].update({k: metrics.get(k) for k in ("fold", "items", "candidates", "new_pairs", "val_pairs",
                                                            "replay_pairs", "replay_info", "steps", "train_seconds",
                                                            "cost", "stayed", "base_model")})
            rec["fold"]["gate"] = {k: v for k, v in metrics["gate"].items() if k != "items"}
            rec["fold"]["test"] = {"before": {k: v for k, v in metrics["before"].items() if not k.endswith("_rankings")},
                                   "after": metrics["after"]}
            r = Retriever.from_run(work, device="cpu")
            t = time.time()
            folded = set(metrics.get("folded") or [])
            rec["after_fold"] = _measure(r, old, [p for p in part_test if p[1] in folded], folded=True, beams=args.beams)
            rec["after_fold"]["new_merged_all"] = _recall(r.search([q for q, _ in part_test], k=10, num_beams=args.beams),
                                                          part_test)
            if earlier:
                rec["after_fold"]["earlier_merged"] = _recall(r.search([q for q, _ in earlier], k=10, num_beams=args.beams), earlier)
            rec["after_fold"]["seconds"] = time.time() - t
            rec["after_fold"]["fallback_items"] = len(r.fallback)
        else:
            r = Retriever.from_run(work, device="cpu")
        result["rounds"].append(rec)
        out_path.write_text(json.dumps(result, indent=2, default=str))
    r.close()
    if "dt_trained" in result:
        fb = result["rounds"][0]["after_adds"]["new_fallback"]["R@10"]
        result["fallback_over_dt_trained_R@10"] = fb / result["dt_trained"]["over_new_items"]["R@10"]
    result["machine"]["load_avg_end"] = os.getloadavg()
    out_path.write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    return result


def summary(res: dict) -> str:
    """Markdown table of the recall figures, one block per add + fold round."""
    def cell(d, key):
        m = (d or {}).get(key)
        return "-" if m is None else f"{m['R@1']:.1f} / {m['R@10']:.1f}"

    lines = []
    for rec in res["rounds"]:
        fold = rec.get("fold", {})
        gate = fold.get("gate", {})
        lines += [f"round {rec['round']}: {rec['adds']['items']} items added"
                  + (f"; fold: {fold.get('items')} folded, {len(fold.get('stayed') or [])} stayed in the fallback "
                     f"(gate: {gate.get('why')}), {fold.get('steps')} steps, {fold.get('train_seconds') or 0:.0f} s "
                     f"fine-tuning, {fold.get('seconds') or 0:.0f} s for train.py fold" if fold else ""), "",
                  "| R@1 / R@10 | before adds | after adds | after fold |", "| --- | --- | --- | --- |"]
        before = res["before_adds"] if rec["round"] == 1 else None
        test = fold.get("test", {})
        rows = [("old items, generative path", before, "old_generative", rec["after_adds"], "old_generative",
                 rec.get("after_fold"), "old_generative"),
                ("old items, merged search", before, "old_merged", rec["after_adds"], "old_merged",
                 rec.get("after_fold"), "old_merged"),
                ("folded items: fallback (before) / generative (after)", None, None, test.get("before"), "folded_fallback",
                 test.get("after"), "new_generative"),
                ("folded items, merged search (before / after the fold)", None, None, test.get("before"), "folded_merged",
                 test.get("after"), "folded_merged"),
                ("this round's new items, merged search", None, None, rec["after_adds"], "new_merged",
                 rec.get("after_fold"), "new_merged_all"),
                ("earlier rounds' items, merged search", None, None, rec["after_adds"], "earlier_merged",
                 rec.get("after_fold"), "earlier_merged")]
        for label, b, bk, a, ak, f, fk in rows:
            lines.append(f"| {label} | {cell(b, bk) if b else '-'} | {cell(a, ak)} | {cell(f, fk)} |")
        lines.append("")
    dt = res.get("dt_trained")
    if dt:
        lines += [f"DT trained on the new items' queries: R@10 {dt['over_new_items']['R@10']:.1f} over the "
                  f"{dt['over_new_items']['candidates']} new items, {dt['over_all_items']['R@10']:.1f} over all "
                  f"{dt['over_all_items']['candidates']}; fallback / DT trained (same candidates) = "
                  f"{res['fallback_over_dt_trained_R@10']:.3f}"]
    adds = res["rounds"][0]["adds"]
    lines += [f"adds: {adds['items_per_s_add_items']:.1f} items/s through add_items "
              f"({adds['items_per_s_with_encoding']:.1f} items/s with encoding); fallback bytes/item "
              f"{adds['fallback_bytes_per_item']}; store bytes/item {adds['store_bytes_per_item']:.0f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
