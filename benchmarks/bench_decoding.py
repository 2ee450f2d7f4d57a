"""Queries/second of constrained beam search vs trie size (default AceConfig, untrained weights).

    python benchmarks/bench_decoding.py --sizes 1000 10000 100000 1000000 --out benchmarks/results/decoding.md

Random identifiers with level_sizes [128, 128, 128, U]; random queries of ``--query-len`` tokens.
Throughput is measured with batch ``--batch`` (default 100) and beam ``--beams`` (default 5), in
fp32 and with dynamic int8 Linear layers; plus batch-1 latency. Flatness = max/min q/s over sizes.
Weights are random: speed does not depend on training (beam search always runs L steps).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ace.model.decoding import _allowed_children, _trie_tensors, constrained_beam_search, quantize_dynamic_int8  # noqa: E402
from ace.model.config import AceConfig  # noqa: E402
from ace.model.modeling import AceModel  # noqa: E402
from ace.bench.synthetic import random_codes  # noqa: E402
from ace.model.tokens import IdentifierVocab  # noqa: E402
from identifiers.trie import FlatTrie  # noqa: E402


def qps_pass(model, batches, trie, vocab, beams) -> tuple[float, float]:
    """(queries per wall-clock second, queries per CPU-second of this process) of one pass."""
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for ids, mask in batches:
        constrained_beam_search(model, ids, mask, trie, vocab, num_beams=beams)
        n += ids.shape[0]
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def latency_ms(model, queries, trie, vocab, beams) -> list[float]:
    """Batch-1 latencies (ms) of single queries."""
    ids, mask = queries
    times = []
    for i in range(ids.shape[0]):
        t = time.perf_counter()
        constrained_beam_search(model, ids[i:i + 1], mask[i:i + 1], trie, vocab, num_beams=beams)
        times.append(1000 * (time.perf_counter() - t))
    return times


def mask_cost(tries: dict, level_sizes, batch: int, beams: int, repeats: int, rng) -> list[str]:
    """Time of building the allowed-token masks alone (all L levels, batch x beams random live
    prefixes of the trie) per trie size: the part of the search that touches the trie."""
    lines = ["| identifiers | mask building per batch, all levels (ms) |", "|---:|---:|"]
    for n, trie in tries.items():
        tt = _trie_tensors(trie, torch.device("cpu"))
        codes = trie_codes_sample(trie, batch * beams, rng)             # (R, L) existing identifiers
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            node = torch.zeros(batch * beams, dtype=torch.long)
            for d, size in enumerate(level_sizes):
                _, child = _allowed_children(node, tt, size)
                node = child[torch.arange(node.shape[0]), codes[:, d]]
            times.append(1000 * (time.perf_counter() - t))
        assert (node >= 0).all()
        lines.append(f"| {n:,} | {statistics.median(times):.2f} |")
    return lines


def trie_codes_sample(trie, r: int, rng) -> torch.Tensor:
    """r random identifiers that are in the trie (walk random children from the root)."""
    node = np.zeros(r, dtype=np.int64)
    out = []
    for _ in range(trie.length):
        pick = trie.child_start[node] + (rng.random(r) * trie.child_count[node]).astype(np.int64)
        out.append(trie.child_code[pick])
        node = trie.child_node[pick]
    return torch.as_tensor(np.stack(out, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--num-batches", type=int, default=3)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--u", type=int, default=32, help="size of the last (u) level")
    ap.add_argument("--query-len", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=str, default=None, help="write a markdown report here")
    ap.add_argument("--mask-only", action="store_true", help="only time the trie mask building (no model)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    level_sizes = [128, 128, 128, args.u]
    config = AceConfig(level_sizes=level_sizes)
    vocab = IdentifierVocab(level_sizes)
    models = {"fp32": AceModel(config).eval()}
    models["int8-dynamic"] = quantize_dynamic_int8(models["fp32"])
    n_params = sum(p.numel() for p in models["fp32"].parameters())

    # queries of realistic length with some padding
    def make_batch(b):
        ids = torch.randint(3, config.query_vocab_size, (b, args.query_len))
        lens = torch.randint(args.query_len // 2, args.query_len + 1, (b,))
        mask = (torch.arange(args.query_len)[None] < lens[:, None]).long()
        return ids * mask, mask
    batches = [make_batch(args.batch) for _ in range(args.num_batches)]
    lat_queries = make_batch(args.latency_queries)

    tries, builds = {}, {}
    for n in args.sizes:
        t = time.perf_counter()
        tries[n] = FlatTrie.from_codes(random_codes(n, level_sizes, rng), level_sizes)
        builds[n] = time.perf_counter() - t
        print(f"trie {n:>8}: {tries[n].num_nodes:,} nodes, built in {builds[n]:.2f}s", flush=True)
    mask_lines = mask_cost(tries, level_sizes, args.batch, args.beams, max(args.repeats, 5), rng)
    print("\n".join(mask_lines), flush=True)
    if args.mask_only:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(mask_lines) + "\n")
        return
    for model in models.values():                                   # warm-up
        qps_pass(model, batches[:1], tries[args.sizes[0]], vocab, args.beams)
    # Interleave sizes within every repeat so that load drift on a shared machine hits all sizes alike.
    qps = {(n, k): [] for n in args.sizes for k in models}
    cpu_qps = {(n, k): [] for n in args.sizes for k in models}
    lat = {(n, k): [] for n in args.sizes for k in models}
    for r in tqdm(range(args.repeats), desc="repeats"):
        order = args.sizes[r % len(args.sizes):] + args.sizes[:r % len(args.sizes)]
        for n in order:
            for k, model in models.items():
                wall, cpu = qps_pass(model, batches, tries[n], vocab, args.beams)
                qps[n, k].append(wall)
                cpu_qps[n, k].append(cpu)
                lat[n, k] += latency_ms(model, lat_queries, tries[n], vocab, args.beams)
    rows = []
    for n in args.sizes:
        row = {"n": n, "build_s": builds[n]}
        for k in models:
            row[k] = statistics.median(qps[n, k])
            row[k + "_best"] = max(qps[n, k])
            row[k + "_cpu"] = statistics.median(cpu_qps[n, k])
            row[k + "_lat"] = statistics.median(lat[n, k])
        rows.append(row)
        print(f"trie {n:>8}: " + " | ".join(
            f"{k}: {row[k]:.0f} q/s (best {row[k + '_best']:.0f}, per CPU-s {row[k + '_cpu']:.0f}), "
            f"batch-1 {row[k + '_lat']:.1f} ms"
            for k in models), flush=True)

    flat = {k: max(r[k] for r in rows) / min(r[k] for r in rows) for k in models}
    flat_best = {k: max(r[k + "_best"] for r in rows) / min(r[k + "_best"] for r in rows) for k in models}
    flat_cpu = {k: max(r[k + "_cpu"] for r in rows) / min(r[k + "_cpu"] for r in rows) for k in models}
    load = os.getloadavg()
    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    lines = [
        "# Constrained beam search throughput vs trie size",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads. Load average at the end of the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(the machine was shared with other engineers' processes, so absolute figures are noisy).",
        "",
        f"Model: default AceConfig (d_model {config.d_model}, {config.n_heads} heads, {config.encoder_layers} encoder + "
        f"{config.decoder_layers} decoder layers, ffn {config.ffn_dim}, fusion on, {n_params / 1e6:.1f}M parameters, "
        f"random weights). Identifiers: level_sizes {level_sizes}, random distinct codes. Queries: "
        f"{args.query_len // 2}-{args.query_len} tokens. Beam {args.beams}, batch {args.batch} "
        f"({args.num_batches} batches per pass; {args.repeats} passes per trie size, sizes interleaved within each "
        f"repeat; median and best pass), batch-1 latency = median over {args.latency_queries} x {args.repeats} "
        f"single queries.",
        "",
        "| identifiers | trie build (s) | " + " | ".join(
            f"{k} q/s median (best) | {k} q per CPU-s | {k} batch-1 ms" for k in models) + " |",
        "|---:|---:|" + "---:|---:|---:|" * len(models),
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['build_s']:.2f} | " + " | ".join(
            f"{r[k]:.0f} ({r[k + '_best']:.0f}) | {r[k + '_cpu']:.0f} | {r[k + '_lat']:.1f}" for k in models) + " |")
    lines += ["", "Trie-mask building alone (the only part of the search that touches the trie), "
              f"batch {args.batch} x beam {args.beams}:", ""] + mask_lines
    lines += ["", "Flatness = max/min q/s over trie sizes (target <= 1.15): median passes " +
              ", ".join(f"{k} {v:.3f}" for k, v in flat.items()) + "; best passes " +
              ", ".join(f"{k} {v:.3f}" for k, v in flat_best.items()) + "; per CPU-second " +
              ", ".join(f"{k} {v:.3f}" for k, v in flat_cpu.items()), "",
              "q per CPU-s = queries / CPU time of the benchmark process: with 1 thread on a busy machine it "
              "estimates what one idle core does (wall-clock q/s is lower because other processes hold the cores).",
              ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
