"""Plots of the efficiency benchmark and the rule for the recall they draw.

The recall-vs-throughput plot pairs a method's measured throughput with a *trained* model's measured
recall of the same shape, and nothing else:

- ``--trained METHOD=SOURCE`` (repeatable) names the figure of one measured method (a row's method
  name: ``minilm-fp32``, ``minilm-int8``, ``DT-torch``, ...). SOURCE is a run folder (its
  ``metrics.json``, R@10 at the benchmark's beam width; ``model/config.json`` gives the shape) or
  ``quality.json#NAME`` (a row of ``python -m ace.bench quality``, e.g. ``quality.json#ace beam 5``;
  the shape comes from the quality run's saved config of that method).
- An ACE figure must come from a model of the same architecture (``ARCH``: sizes, encoder, fused
  layers) and precision (an ``-int8`` row needs an int8 figure, an ``-fp32`` row an fp32 one) at the
  same beam width; a pure generative row takes no hybrid-mode figure, and a hybrid row (``...-hybrid``,
  ``--hybrid-beams``) only a hybrid-mode figure of its top-B and item-vector storage. Otherwise it is an error.
- A DT figure applies only to exact DT rows (torch / faiss flat) at the text encoder's own
  dimension (no random projection) with a ``dt_*`` quality method.
- Every other row (no figure, ANN rows, projected DT rows) is drawn as throughput only (a vertical
  line) and listed in the notes; no row is ever drawn at another model's recall.
"""
from __future__ import annotations

import json
from pathlib import Path

ARCH = ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ffn_dim", "fusion", "pretrained_encoder",
        "pretrained_encoder_layers", "prototype_levels")
EXACT_DT = ("DT-torch", "DT-faiss_flat")


class PlotError(ValueError):
    """A trained figure that cannot be paired with a measured method; the message says why."""


def read_json(path, what: str):
    """A JSON file, with a clear error when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlotError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise PlotError(f"{what} {path} is not valid JSON: {exc}") from None


def encoder_name(value) -> str | None:
    """A pretrained encoder's comparable name: "minilm" for the offline MiniLM (by name or folder)."""
    if not value:
        return None
    from ace.data.encoders import MINILM, minilm_path
    if value in ("minilm", MINILM, "sentence-transformers/" + MINILM) or Path(str(value)).name == MINILM:
        return "minilm"
    try:
        if Path(value).resolve() == Path(minilm_path()).resolve():
            return "minilm"
    except Exception:                                           # noqa: BLE001 - no MiniLM installed
        pass
    return Path(str(value)).name


def model_arch(cfg) -> dict:
    """The architecture fields of an AceConfig, ModelSection or their dict, encoder names normalised."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    defaults = {"fusion": True, "pretrained_encoder_layers": None, "prototype_levels": 0}
    arch = {k: get(k, defaults.get(k)) for k in ARCH}
    arch["pretrained_encoder"] = encoder_name(arch["pretrained_encoder"])
    return arch


def parse_trained(specs: list[str]) -> list[tuple[str, str, str | None]]:
    """``METHOD=SOURCE`` -> (method, path, quality method or None for a run folder)."""
    out = []
    for spec in specs:
        method, sep, source = spec.partition("=")
        if not sep or not method.strip() or not source.strip():
            raise PlotError(f"--trained {spec!r}: use METHOD=RUN_DIR or METHOD=quality.json#NAME")
        path, _, name = source.partition("#")
        out.append((method.strip(), path.strip(), name.strip() or None))
    if len({m for m, _, _ in out}) < len(out):
        raise PlotError("--trained names a method twice")
    return out


def quality_rows(data: dict) -> dict[str, dict]:
    """``ace.bench quality`` JSON -> {"ace beam 5": row, "dt_doc_plus_queries": row, ...}."""
    rows = data.get("summary") or data.get("rows") or []
    out = {}
    for row in rows:
        if isinstance(row, dict) and row.get("method") and "R@10" in row:
            beams = row.get("beams")
            out.setdefault(f"{row['method']} beam {beams}" if beams else row["method"], row)
    return out


def figure_from_quality(path: str, name: str) -> dict:
    """{R@1, R@10, method, beams, arch (ACE only), int8, hybrid, storage, source} of one quality.json row."""
    from ace.bench.quality_hybrid import HYBRID_VARIANTS
    from ace.bench.quality_methods import INT8_VARIANTS

    data = read_json(path, "quality JSON")
    rows = quality_rows(data)
    if name not in rows:
        raise PlotError(f"{name!r} is not a method of {path}; it has: {', '.join(rows) or 'none'}")
    row = rows[name]
    method = row["method"]
    hybrid = "hybrid" in method
    fig = {"R@1": row.get("R@1"), "R@10": row["R@10"], "method": method, "beams": row.get("beams"),
           "int8": method in INT8_VARIANTS,        # the model's precision (a hybrid's "_int8" is its item vectors)
           "hybrid": hybrid, "storage": HYBRID_VARIANTS.get(method) if hybrid else None,
           "source": f"{path}#{name}", "arch": None}
    if method.startswith("ace"):
        from ace.bench.quality import ACE_VARIANTS
        folder = ACE_VARIANTS.get(method, (method,))[0]
        seeds = row.get("seeds") or [row.get("seed", 0)]
        config = (data.get("configs") or {}).get(f"{folder}/seed{seeds[0]}")
        if not config or "model" not in config:
            raise PlotError(f"{path} has no saved config for {folder}/seed{seeds[0]}: the shape of {name!r} is unknown")
        fig["arch"] = model_arch(config["model"])
    return fig


def figure_from_run(run_dir: str, beams: int) -> dict:
    """The eval stage's R@10 at ``beams`` of a trained run folder, and its model's architecture."""
    run = Path(run_dir)
    metrics = read_json(run / "metrics.json", "metrics.json of the run")
    by_beams = metrics.get("beams") or {}
    if str(beams) not in by_beams:
        raise PlotError(f"{run}/metrics.json has no figures at beam {beams} (it has beams "
                        f"{', '.join(by_beams) or 'none'}); evaluate the run at eval.num_beams=[{beams}]")
    arch = model_arch(read_json(run / "model" / "config.json", "model config of the run"))
    m = by_beams[str(beams)]
    hybrid = (run / "hybrid").is_dir()
    scorer = run / "hybrid" / "scorer.json"
    storage = read_json(scorer, "hybrid scorer of the run").get("storage") if scorer.is_file() else None
    return {"R@1": m.get("R@1"), "R@10": m["R@10"], "method": "ace", "beams": beams, "int8": False,
            "hybrid": hybrid, "storage": storage, "source": f"{run}/metrics.json", "arch": arch}


def trained_figures(result: dict, specs: list[str]) -> dict[str, dict]:
    """Method name -> trained figure, checked against the measured method (see the module doc)."""
    methods = {r["method"]: r for r in result["rows"]}
    out = {}
    for method, path, name in parse_trained(specs):
        if method not in methods:
            raise PlotError(f"--trained names {method!r}, which this run did not measure (methods: "
                            f"{', '.join(methods)})")
        row = methods[method]
        hybrid_row = method.endswith("-hybrid")
        beams = result["config"].get("hybrid_beams") if hybrid_row else result["config"]["beams"]
        fig = figure_from_quality(path, name) if name else figure_from_run(path, beams)
        if row["family"] == "ACE":
            shape = result["ace_shapes"].get(method, {})
            want = shape.get("arch")
            if want is None:
                raise PlotError(f"{method}: this efficiency.json does not record the shape's architecture; "
                                f"re-measure with the current code")
            if fig["arch"] is None:
                raise PlotError(f"{method}: {fig['source']} is not an ACE model's figure")
            diff = [f"{k} {fig['arch'].get(k)!r} != {want.get(k)!r}" for k in ARCH if fig["arch"].get(k) != want.get(k)]
            if diff:
                raise PlotError(f"{method}: {fig['source']} is another shape ({'; '.join(diff)})")
            if fig["int8"] != method.removesuffix("-hybrid").endswith("-int8"):
                raise PlotError(f"{method}: {fig['source']} is a {'int8' if fig['int8'] else 'fp32'} model's figure")
            if fig["hybrid"] and not hybrid_row:
                raise PlotError(f"{method}: {fig['source']} is the hybrid mode's figure (log-prob + cosine re-rank); "
                                f"this row measures the pure generative search")
            if hybrid_row and not fig["hybrid"]:
                raise PlotError(f"{method}: {fig['source']} is the pure generative search's figure; this row measures "
                                f"the hybrid mode (log-prob + cosine re-rank)")
            storage = shape.get("hybrid_storage")
            if hybrid_row and fig.get("storage") != storage:
                raise PlotError(f"{method}: {fig['source']} re-ranks with {fig.get('storage')} item vectors, this row "
                                f"with {storage}")
            if fig["beams"] != beams:
                raise PlotError(f"{method}: {fig['source']} was decoded with beam {fig['beams']}, this run with {beams}")
        else:
            if method not in EXACT_DT:
                raise PlotError(f"{method}: recall figures apply to exact DT rows only ({', '.join(EXACT_DT)}); an "
                                f"ANN row is drawn with its throughput only")
            if not fig["method"].startswith("dt"):
                raise PlotError(f"{method}: {fig['source']} is not a dual-tower figure")
        out[method] = fig
    return out


def drawable(row: dict, figures: dict, native_dim: int | None) -> dict | None:
    """The trained figure a row may be drawn at, or None (throughput only)."""
    fig = figures.get(row["method"])
    if fig is None:
        return None
    if row["family"] == "DT" and native_dim is not None and row["dim"] != native_dim:
        return None                                  # a random projection to D, not the trained model
    return fig


def plot(result: dict, out: Path, figures: dict, *, batch: int, threads: int) -> tuple[list[str], list[str]]:
    """throughput_vs_corpus_size.png + recall_vs_throughput.png (trained figures only); (paths, notes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["device"] == "cpu"] or result["rows"]
    dims = sorted({r["dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["n"], r["qps_median"]) for r in rows if r["dim"] == d and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if method.startswith("DT") else "--", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("corpus size N (items)")
        ax.set_ylabel("queries / s (end-to-end, batch %d)" % batch)
        ax.set_title(f"DT item vectors D={d} ({rows[0]['device']}, {threads} threads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "throughput_vs_corpus_size.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    n = max(r["n"] for r in rows)
    native = result.get("text_encoder_dim")
    top = [r for r in rows if r["n"] == n]
    drawn = {r["method"] for r in top if drawable(r, figures, native)}
    notes = []
    if not drawn:
        notes.append("recall_vs_throughput.png was not drawn: no measured method has a trained recall figure "
                     "(--trained METHOD=RUN_DIR | quality.json#NAME); speed only.")
        return [str(p) for p in paths], notes
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for i, r in enumerate(r for r in top if r["dim"] == d):
            f = drawable(r, figures, native)
            if f is not None:
                ax.scatter(r["qps_median"], f["R@10"], label=f"{r['method']}: R@10 {f['R@10']:.1f}")
            else:
                ax.axvline(r["qps_median"], ls=":", lw=1, color=f"C{i % 10}", label=f"{r['method']} (throughput only)")
        ax.set_xscale("log")
        ax.set_xlabel(f"queries / s at N={n:,} (end-to-end)")
        ax.set_ylabel("R@10 of the trained model (its own run)")
        ax.set_title(f"recall vs throughput, D={d}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "recall_vs_throughput.png")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    srcs = "; ".join(f"{m} = {figures[m]['source']}" for m in sorted(drawn))
    rest = sorted({r["method"] for r in top} - drawn)
    notes.append(f"recall_vs_throughput.png: each point is a trained model's R@10 of the same shape and precision "
                 f"({srcs}; measured on that run's real caption corpus, the throughput on the synthetic N={n:,}). "
                 f"Drawn as throughput only (vertical lines, no trained figure of that model): {', '.join(rest) or 'none'}.")
    return [str(p) for p in paths], notes
