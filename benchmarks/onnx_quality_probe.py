"""Does the query encoder's engine change a trained ACE run's recall? R@1 / R@10 on the run's test queries.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/onnx_quality_probe.py --run RUN [--modes generative hybrid]

Each variant loads the run with ``Retriever.from_run`` (no fallback) and changes only how the query is
encoded / decoded:
- ``torch-fp32``: as served by default;
- ``torch-int8``: ``from_run(quantize=True)``, the whole model in torch dynamic int8 (serving's int8);
- ``enc-torch-int8``: only the encoder in torch int8, the decoder fp32;
- ``enc-ort-fp32`` / ``enc-ort-int8``: ``model.encode`` run by ONNX Runtime (``ace.bench.onnx_engine``), decoder fp32;
- ``enc-ort-int8+dec-int8``: the ORT int8 encoder with the torch-int8 model's decoder.
Point it at a copy of the run folder: loading may create the run's item store (RUN/store.sqlite).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_onnx_ace_e2e import with_engine_encoder  # noqa: E402

from ace.bench.onnx_engine import build_engines  # noqa: E402
from ace.model.decoding import quantize_dynamic_int8  # noqa: E402
from ace.serving.retriever import Retriever  # noqa: E402

VARIANTS = ("torch-fp32", "torch-int8", "enc-torch-int8", "enc-ort-fp32", "enc-ort-int8", "enc-ort-int8+dec-int8")


def load_variant(run: str, name: str, workdir: Path) -> Retriever:
    r = Retriever.from_run(run, device="cpu", quantize=name in ("torch-int8", "enc-ort-int8+dec-int8"), fallback=False)
    m = r.model
    if name == "enc-torch-int8":
        m.encoder = quantize_dynamic_int8(m.encoder)
    elif name.startswith("enc-ort"):
        # the int8 model's encoder is already quantised: export the fp32 encoder of a second load
        src = m if "dec-int8" not in name else Retriever.from_run(run, device="cpu", fallback=False).model
        bert = src.encoder.bert
        kind = "ort-fp32" if name == "enc-ort-fp32" else "ort-int8"
        engine = build_engines(bert, workdir, engines=(kind,), fused_layers=m.config.encoder_layers)[kind]
        with_engine_encoder(m, engine)
    return r


def recall(r: Retriever, queries: list, mode: str, beams: int) -> dict:
    texts, gold = [q for q, _ in queries], [i for _, i in queries]
    t = time.perf_counter()
    hits = r.search(texts, k=10, num_beams=beams, mode=mode)
    secs = time.perf_counter() - t
    ranks = [next((j for j, h in enumerate(row) if h.item_id == g), None) for row, g in zip(hits, gold)]
    n = len(ranks)
    return {"R@1": 100 * sum(x == 0 for x in ranks) / n, "R@10": 100 * sum(x is not None for x in ranks) / n,
            "queries": n, "seconds": secs, "top1": [row[0].item_id if row else None for row in hits]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--modes", nargs="+", default=["generative", "hybrid"])
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--limit", type=int, default=0, help="first N test queries (0 = all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/onnx_quality"))
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    queries = json.loads((Path(args.run) / "test_queries.json").read_text())
    queries = queries[:args.limit] if args.limit else queries
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, ref_top1 = [], {}
    for name in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            r = load_variant(args.run, name, Path(tmp))
            for mode in args.modes:
                res = recall(r, queries, mode, args.beams)
                top1 = res.pop("top1")
                ref_top1.setdefault(mode, top1)
                res["top1_same_as_first"] = 100 * sum(a == b for a, b in zip(top1, ref_top1[mode])) / len(top1)
                rows.append({"variant": name, "mode": mode, **res})
                print(f"{name} {mode}: R@1 {res['R@1']:.2f} R@10 {res['R@10']:.2f} top-1 same as "
                      f"{args.variants[0]} {res['top1_same_as_first']:.1f} % ({res['seconds']:.0f} s)", flush=True)
        del r
    result = {"command": " ".join(sys.argv), "run": args.run, "beams": args.beams, "rows": rows,
              "load": os.getloadavg()}
    (out / "onnx_quality.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
