"""Serving latency with each query-encoder engine (serve.py --encoder-engine), on a trained run.

    OMP_NUM_THREADS=1 python benchmarks/bench_serving_engines.py --run runs/mscoco_80_20_hybrid \
        --queries 200 --batch-sizes 1 32 --modes generative hybrid --out benchmarks/out/serving_engines.json

Loads the run once per engine (torch, ort-fp32, ort-int8; ``--quantize`` adds the torch int8 decoder to
each) through ``Retriever.from_run(encoder_engine=...)``, exactly as serve.py does, and times
``Retriever.search`` on the run's held-out test queries (a seeded sample), end to end (tokenise, encode,
decode, re-rank). The engines are interleaved: every round times each engine once on the same batch, in a
rotated order, so machine load falls on all of them alike; the figure is the median ms per query over the
rounds, and each ratio is torch's median over the engine's, measured in the same run. Agreement: the share
of queries whose first hit equals torch's, and of top-10 lists that are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.model.onnx_encoder import SERVING_ENGINES as ENGINES  # noqa: E402
from ace.run_folder import RunPaths, read_pairs  # noqa: E402
from ace.serving.retriever import Retriever  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--quantize", action="store_true", help="torch dynamic int8 for the rest of the model (serve.py --quantize)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--modes", nargs="+", default=["generative", "hybrid"], choices=["generative", "hybrid"])
    ap.add_argument("--beams", type=int, default=None, help="default: the run's hybrid candidates (hybrid) / 10")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per batch size (0: enough for --queries)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    test = read_pairs(RunPaths(args.run).test_queries)
    if not test:
        raise SystemExit(f"bench_serving_engines: {args.run} has no held-out test queries")
    queries = [q for q, _ in random.Random(args.seed).sample(test, min(args.queries, len(test)))]
    retrievers = {e: Retriever.from_run(args.run, device="cpu", fallback=False, quantize=args.quantize, encoder_engine=e)
                  for e in args.engines}
    has_hybrid = retrievers[args.engines[0]].hybrid is not None
    modes = [m for m in args.modes if m != "hybrid" or has_hybrid]
    result: dict = {"run": str(args.run), "engines": args.engines, "quantize": args.quantize, "queries": len(queries),
                    "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "loadavg_start": os.getloadavg(),
                    "rows": []}
    try:
        for mode in modes:
            beams = args.beams or (retrievers[args.engines[0]].hybrid.scorer.candidates if mode == "hybrid" else 10)
            for bs in args.batch_sizes:
                batches = [queries[i:i + bs] for i in range(0, len(queries), bs)]
                rounds = args.rounds or len(batches)
                times: dict[str, list[float]] = {e: [] for e in args.engines}
                tops: dict[str, list[list[str]]] = {e: [] for e in args.engines}
                for e in args.engines:   # warm-up (first-call allocations), and each engine's results
                    hits = retrievers[e].search(queries, k=10, num_beams=beams, mode=mode, batch_size=100)
                    tops[e] = [[h.item_id for h in row] for row in hits]
                for r in range(rounds):
                    batch = batches[r % len(batches)]
                    order = args.engines[r % len(args.engines):] + args.engines[:r % len(args.engines)]
                    for e in order:
                        t = time.perf_counter()
                        retrievers[e].search(batch, k=10, num_beams=beams, mode=mode, batch_size=max(bs, 1))
                        times[e].append(1000 * (time.perf_counter() - t) / len(batch))
                base = statistics.median(times["torch"]) if "torch" in times else None
                for e in args.engines:
                    med = statistics.median(times[e])
                    row = {"mode": mode, "beams": beams, "batch": bs, "engine": e, "ms_per_query": med,
                           "speedup_vs_torch": (base / med) if base else None, "rounds": rounds}
                    if "torch" in tops:
                        row["top1_same_as_torch"] = 100 * sum(a[:1] == b[:1] for a, b in zip(tops[e], tops["torch"])) / len(queries)
                        row["top10_same_as_torch"] = 100 * sum(a == b for a, b in zip(tops[e], tops["torch"])) / len(queries)
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for r in retrievers.values():
            r.close()
    result["loadavg_end"] = os.getloadavg()
    lines = ["| mode | beams | batch | engine | ms / query | x torch | top-1 = torch | top-10 = torch |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['beams']} | {r['batch']} | {r['engine']}{' + int8 decoder' if args.quantize else ''} | "
                     f"{r['ms_per_query']:.1f} | {(r['speedup_vs_torch'] or 0):.2f} | {r.get('top1_same_as_torch', 0):.1f} % | "
                     f"{r.get('top10_same_as_torch', 0):.1f} % |")
    result["table"] = "\n".join(lines)
    print(result["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
