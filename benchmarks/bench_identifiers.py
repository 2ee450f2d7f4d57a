"""Identifier benchmarks: caption-proxy MSCOCO val (quality) and synthetic 10k/100k/1M x 1024 (scale).

    python benchmarks/bench_identifiers.py caption [key=value ...]
    python benchmarks/bench_identifiers.py synthetic --sizes 10000,100000,1000000 [key=value ...]
    python benchmarks/bench_identifiers.py trie --sizes 1000,100000,1000000

caption: item document = caption 1 of ../shared/data/mscoco/mscoco_val.json, MiniLM embeddings
(cached in benchmarks/out/), identifiers with the IdentifierConfig defaults (+ overrides); prints
collision rate (share of items with u > 0), max u and per-level codebook usage.
synthetic: a Gaussian mixture (2000 components) in 1024-d, L2-normalised, written chunkwise to
a memory-mapped .npy in benchmarks/out/; each size is built in a fresh subprocess so peak RSS
(ru_maxrss) is that build's alone. Prints wall time, CPU time and peak memory per size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
COCO = ROOT.parent / "shared" / "data" / "mscoco" / "mscoco_val.json"


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_build(emb, ids, overrides) -> dict:
    from ace.config import load_config
    from identifiers import IdentifierConfig, SemanticIdTokenizer

    config = load_config(IdentifierConfig, None, overrides)
    t, c = time.time(), cpu_seconds()
    tok = SemanticIdTokenizer.fit(emb, ids, config, progress=True)
    summary = tok.summary()
    summary.update(wall_s=time.time() - t, cpu_s=cpu_seconds() - c,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   config=overrides, rqvae_steps=tok.stats.get("rqvae_steps"))
    return summary


def caption(args) -> None:
    from identifiers.__main__ import format_summary

    cache = OUT / "mscoco_val_minilm.npy"
    from ace.data.importers import load_proxy_split
    split = load_proxy_split(COCO)
    if cache.exists():
        emb = np.load(cache)
    else:
        from ace.data.encoders import TextEncoder
        emb = TextEncoder().encode(split.documents, progress=True)
        OUT.mkdir(parents=True, exist_ok=True)
        np.save(cache, emb)
    assert emb.shape[0] == len(split.item_ids), "cached embeddings do not match the split"
    summary = run_build(emb, split.item_ids, args.overrides)
    print(f"mscoco val caption-proxy: {emb.shape[0]} items x {emb.shape[1]}-d MiniLM")
    print(format_summary(summary))
    print(f"wall {summary['wall_s']:.1f}s, cpu {summary['cpu_s']:.1f}s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    print("JSON " + json.dumps(summary))


def synthetic_file(n: int, dim: int, seed: int = 0, components: int = 2000) -> Path:
    """Gaussian mixture, L2-normalised, in benchmarks/out/synthetic_{n}x{dim}_s{seed}.npy (ace.bench.synthetic)."""
    from ace.bench.synthetic import mixture_embeddings_file
    return mixture_embeddings_file(OUT, n, dim, seed=seed, components=components)


def synthetic_one(args) -> None:
    emb = np.load(args.file, mmap_mode="r")
    ids = [f"s{i}" for i in range(emb.shape[0])]
    summary = run_build(emb, ids, args.overrides)
    print("JSON " + json.dumps(summary))


def synthetic(args) -> None:
    from identifiers.__main__ import format_summary

    rows = []
    for n in args.sizes:
        path = synthetic_file(n, args.dim)
        cmd = [sys.executable, __file__, "_one", "--file", str(path), *args.overrides]
        print(f"== {n} x {args.dim}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stdout)
            raise SystemExit(f"build of {n} failed with exit code {proc.returncode}")
        summary = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("JSON "))[5:])
        print(format_summary(summary))
        print(f"wall {summary['wall_s']:.1f}s, cpu {summary['cpu_s']:.1f}s, peak RSS {summary['peak_rss_mb']:.0f} MB",
              flush=True)
        rows.append((n, summary))
    print("\n| N | D | wall s | CPU s | peak RSS MB | k-means fit s | RQ-VAE fit s | encode s | collision % | max u | usage k/v1/v2 % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, s in rows:
        t = s["times"]
        usage = "/".join(f"{100 * u['share']:.0f}" for u in s["codebook_usage"])
        print(f"| {n} | {args.dim} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_mb']:.0f} | "
              f"{t['kmeans_fit_s']:.1f} | {t['rqvae_fit_s']:.1f} | {t['encode_s']:.1f} | "
              f"{100 * s['collision_rate']:.2f} | {s['max_u']} | {usage} |")


def trie(args) -> None:
    """FlatTrie.from_codes / lookup_rows and IdentifierTrie.from_codes on random unique identifiers."""
    from identifiers.trie import FlatTrie, IdentifierTrie

    levels = (128, 128, 128, 1024)
    rng = np.random.default_rng(0)
    print("| N | FlatTrie.from_codes s | nodes | lookup_rows(all) s | IdentifierTrie.from_codes s |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.sizes:
        codes = np.unique(np.stack([rng.integers(0, s, int(n * 1.01)) for s in levels], 1), axis=0)[:n]
        codes = codes[rng.permutation(codes.shape[0])]
        t = time.time(); flat = FlatTrie.from_codes(codes, levels); t_build = time.time() - t
        t = time.time(); rows = flat.lookup_rows(codes); t_lookup = time.time() - t
        assert (rows == np.arange(codes.shape[0])).all()
        ids = [f"i{i}" for i in range(codes.shape[0])]
        t = time.time(); IdentifierTrie.from_codes(codes, ids, levels); t_id = time.time() - t
        print(f"| {codes.shape[0]} | {t_build:.2f} | {flat.num_nodes} | {t_lookup:.2f} | {t_id:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("caption")
    c.add_argument("overrides", nargs="*")
    s = sub.add_parser("synthetic")
    s.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10_000, 100_000, 1_000_000],
                   help="comma-separated sizes, e.g. 10000,100000,1000000")
    s.add_argument("--dim", type=int, default=1024)
    s.add_argument("overrides", nargs="*")
    t = sub.add_parser("trie")
    t.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1000, 100_000, 1_000_000])
    o = sub.add_parser("_one")
    o.add_argument("--file", required=True)
    o.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    {"caption": caption, "synthetic": synthetic, "trie": trie, "_one": synthetic_one}[args.mode](args)


if __name__ == "__main__":
    main()
