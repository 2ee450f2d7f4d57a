"""The run report: metrics.json -> report.md and plots (training curves, Recall@k, identifier distribution)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ace.run_folder import RunPaths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for ln in path.read_text().splitlines():
        if ln.strip():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                continue  # a line torn by a kill: the log is advisory, the checkpoint is the truth
    return rows


def plot_training_curves(log_rows: list[dict], out: Path) -> Path | None:
    """Loss and validation recall against step."""
    train = [r for r in log_rows if "loss" in r and "step" in r]
    # eval rows are {"step": s, "eval": {"R@1": ..}} (ace.training.loop) or flat {"step": s, "val/R@1": ..}
    flat = [{"step": r["step"], **r["eval"]} if isinstance(r.get("eval"), dict) else r for r in log_rows]
    evals = [r for r in flat if any(k.startswith("R@") or k.startswith("val/R@") for k in r) and "step" in r]
    if not train:
        return None
    plt = _plt()
    fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.5), squeeze=False)
    ax[0, 0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax[0, 0].set(xlabel="step", ylabel="loss", title="training loss")
    if evals:
        for key in sorted({k for r in evals for k in r if k.split("/")[-1].startswith("R@")}):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax[0, 1].plot(*zip(*pts), marker="o", ms=3, label=key.split("/")[-1])
        ax[0, 1].set(xlabel="step", ylabel="%", title="periodic eval recall")
        ax[0, 1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_recall(metrics_by_group: dict[str, dict[str, float]], out: Path) -> Path:
    """Grouped bars of R@1/5/10 and MRR@10 per group (e.g. per modality)."""
    plt = _plt()
    keys = ["R@1", "R@5", "R@10", "MRR@10"]
    groups = list(metrics_by_group)
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, g in enumerate(groups):
        ax.bar(x + i * width, [metrics_by_group[g].get(k, 0.0) for k in keys], width, label=g)
    ax.set_xticks(x + width * (len(groups) - 1) / 2, keys)
    ax.set(ylim=(0, 100), ylabel="%", title="held-out query retrieval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_identifier_distribution(codes: np.ndarray, level_names: list[str], out: Path) -> Path:
    """Items per code at each identifier level (how evenly the identifier space is used)."""
    plt = _plt()
    L = codes.shape[1]
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 3), squeeze=False)
    for j in range(L):
        counts = np.bincount(codes[:, j])
        axes[0, j].bar(np.arange(len(counts)), counts, width=1.0)
        axes[0, j].set(title=f"{level_names[j]}: {np.count_nonzero(counts)} codes used", xlabel="code", ylabel="items")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def metrics_table(rows: dict[str, dict[str, Any]], keys=("R@1", "R@5", "R@10", "MRR@10", "queries")) -> str:
    """Markdown table, one row per group."""
    head = "| group | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = ""
    for name, m in rows.items():
        cells = [f"{m[k]:.1f}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in keys]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def run_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """A run's headline figures under the names ``eval.reference`` uses."""
    out = {}
    if metrics.get("by_group", {}).get("all"):
        out["held-out R@1"] = metrics["by_group"]["all"]["R@1"]
    for name, res in (metrics.get("query_sets") or {}).items():
        a = res["by_group"]["all"]
        out[f"{name} top-1"], out[f"{name} top-5"] = a["top1"], a["top5"]
    return out


def reference_table(reference: dict[str, dict[str, float]], metrics: dict[str, Any]) -> str:
    """Markdown table: the ``eval.reference`` rows, then this run's figures (a dash where one has none)."""
    rows = {**reference, "this run": run_figures(metrics)}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    head = "| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    cell = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "–"
    return head + "".join(f"| {label} | " + " | ".join(cell(r.get(k)) for k in keys) + " |\n" for label, r in rows.items())


def write_report(run_dir: Path, *, title: str, metrics: dict[str, Any], sections: dict[str, str] | None = None,
                 plots: list[Path] | None = None) -> Path:
    """report.md: the headline table, extra sections, and the plots."""
    lines = [f"# {title}", ""]
    by_group = metrics.get("by_group") or {}
    if by_group:
        lines += ["## Retrieval on held-out queries", "", metrics_table(by_group), ""]
    for name, res in (metrics.get("query_sets") or {}).items():
        lines += [f"## Free-form queries judged by metadata: `{res['path']}`", "",
                  "A hit is relevant when the item has the query's attributes (several items may be); "
                  f"beams {metrics.get('headline_beams', '')}, all modalities searched.", "",
                  metrics_table(res["by_group"], keys=("top1", "top5", "queries")), ""]
        missed = [q for q in res["queries"] if q["first_relevant_rank"] != 1]
        if missed:
            lines += ["Queries whose first hit is not relevant (rank of the first relevant hit, first hits):", ""]
            lines += [f"- \"{q['query']}\": {q['first_relevant_rank'] or 'none in the top ' + str(len(q['top']))}"
                      f" ({', '.join(q['top'][:3])})" for q in missed]
            lines += [""]
    for name, text in (sections or {}).items():
        lines += [f"## {name}", "", text.rstrip(), ""]
    for p in plots or []:
        if p is not None:
            lines += [f"![{p.stem}](plots/{p.name})", ""]
    out = RunPaths(run_dir).report
    out.write_text("\n".join(lines))
    return out
