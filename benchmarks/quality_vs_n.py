"""Quality vs corpus size on real captions (issue 14): the table and the plot, from the quality runs.

    python benchmarks/quality_vs_n.py benchmarks/out/union_q/n1000/quality.json \
        benchmarks/out/union_q/n5000/quality.json benchmarks/out/union_q/n16998/quality.json \
        --png benchmarks/results/quality_vs_n.png

Each QUALITY_JSON is the output of ``python -m ace.bench quality`` on one nested subset of the caption
union (``benchmarks/union_subset_file.py``). A method is drawn at an N only where that file has its row
(mean over the seeds it ran); a method missing at some N is drawn over the sizes it was measured at and
the table says "not run" for the others. Nothing is interpolated. The gap column is each method's R@1
minus DT document+queries' R@1 at the same N.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFERENCE = "dt_doc_plus_queries"
LABELS = {"dt_zero_shot": "DT zero-shot", "dt_doc_plus_queries": "DT document+queries",
          "ace_qid_proto": "ACE levers 1 + 3 (pure)", "ace_qid_proto_hybrid": "ACE hybrid (float32)"}


def read_quality(path: str | Path) -> tuple[int, dict[str, dict]]:
    """(items, method -> {"R@1", "R@10", "seeds"}: means over the file's seeds) of one quality.json."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"quality_vs_n: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"quality_vs_n: {path} is not valid JSON: {exc}") from None
    if "items" not in data or "rows" not in data:
        raise SystemExit(f"quality_vs_n: {path} is not a quality.json of `python -m ace.bench quality` (no items / rows)")
    out: dict[str, dict] = {}
    for row in data["rows"]:
        m = out.setdefault(row["method"], {"R@1": [], "R@10": []})
        m["R@1"].append(float(row["R@1"]))
        m["R@10"].append(float(row["R@10"]))
    return int(data["items"]), {k: {"R@1": sum(v["R@1"]) / len(v["R@1"]), "R@10": sum(v["R@10"]) / len(v["R@10"]),
                                    "seeds": len(v["R@1"])} for k, v in out.items()}


def table(sizes: dict[int, dict[str, dict]], methods: list[str]) -> str:
    """Markdown: one row per N, R@1 / R@10 of each method and its R@1 gap to DT document+queries."""
    head = "| N items | " + " | ".join(f"{LABELS.get(m, m)} R@1 / R@10 (gap R@1)" for m in methods) + " |"
    lines = [head, "|---:|" + "---|" * len(methods)]
    for n in sorted(sizes):
        rows, ref = sizes[n], sizes[n].get(REFERENCE)
        cells = []
        for m in methods:
            r = rows.get(m)
            if r is None:
                cells.append("not run")
                continue
            gap = "" if ref is None or m == REFERENCE else f" ({r['R@1'] - ref['R@1']:+.1f})"
            cells.append(f"{r['R@1']:.1f} / {r['R@10']:.1f}{gap}")
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(sizes: dict[int, dict[str, dict]], methods: list[str], png: Path) -> list[str]:
    """R@1 vs N (log x), one line per method over the sizes it was measured at; returns the methods drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = []
    for m in methods:
        pts = [(n, sizes[n][m]["R@1"]) for n in sorted(sizes) if m in sizes[n]]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(m, m))
        drawn.append(m)
    ax.set_xscale("log")
    ax.set_xlabel("items in the corpus (nested subsets of the caption union)")
    ax.set_ylabel("R@1 on held-out captions (%)")
    ax.set_title("Quality vs corpus size (caption proxy, measured points only)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return drawn


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("quality_json", nargs="+", help="quality.json of each corpus size")
    ap.add_argument("--methods", nargs="+", default=list(LABELS))
    ap.add_argument("--png", default=None, help="write the plot here")
    args = ap.parse_args(argv)
    sizes: dict[int, dict[str, dict]] = {}
    for path in args.quality_json:
        n, rows = read_quality(path)
        if n in sizes:
            raise SystemExit(f"quality_vs_n: two files for N = {n} ({path})")
        sizes[n] = rows
    text = table(sizes, args.methods)
    print(text)
    if args.png:
        drawn = plot(sizes, args.methods, Path(args.png))
        print(f"plot: {args.png} ({', '.join(drawn)})", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
