"""Retriever CPU time of one micro-batch (no HTTP): uniform k vs a mix of k and modality filters, decoded
three ways - one call with one k / beam width per query (what the server does now), one call per beam
width (what it did before), and every query at the widest beam (the alternative the issue asked to try).

    python benchmarks/bench_mixed_batch.py --run runs/serving_mix [--batch 32] [--repeats 8]

Prints, per way, the best CPU milliseconds per batch over ``--repeats`` x 5 calls (process time, one
torch thread) and the ratio of uniform traffic's to it. Queries: the run's held-out test queries.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--ks", default="1,5,10,20", help="the mix's k values, cycled")
    args = p.parse_args(argv)

    import torch

    from ace.run_folder import RunPaths, read_pairs
    from ace.serving.retriever import Retriever

    torch.set_num_threads(1)
    r = Retriever.from_run(args.run, device="cpu")
    n = args.batch
    qs = [q for q, _ in read_pairs(RunPaths(args.run).test_queries)][:n]
    combos = [(int(k), m) for m in (None, "image", "audio", "video") for k in args.ks.split(",")]  # as load_test --mix
    ks, mods = [combos[i % len(combos)][0] for i in range(n)], [combos[i % len(combos)][1] for i in range(n)]
    width = [max(r.default_beams, k) for k in ks]

    def by_width():
        for w in sorted(set(width)):
            idx = [i for i in range(n) if width[i] == w]
            r.search([qs[i] for i in idx], k=max(ks[i] for i in idx), num_beams=w, modality=[mods[i] for i in idx])

    ways = {"uniform (k=10, any modality)": lambda: r.search(qs, k=10),
            "mix: one call, own k and width per query": lambda: r.search(qs, k=ks, modality=mods),
            "mix: one call per beam width": by_width,
            "mix: one call, every query at the widest beam": lambda: r.search(qs, k=max(ks), modality=mods)}
    best = {name: float("inf") for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved: machine load hits every way alike
        for name, fn in ways.items():
            c = time.process_time()
            for _ in range(5):
                fn()
            best[name] = min(best[name], (time.process_time() - c) / 5 * 1000)
    base = best["uniform (k=10, any modality)"]
    print(f"| way | CPU ms per batch of {n} | uniform / this |\n| --- | --- | --- |")
    for name, ms in best.items():
        print(f"| {name} | {ms:.1f} | {base / ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
