"""CLI: build identifiers for a file of item embeddings.

    python -m identifiers build --embeddings X.npy --out DIR [--ids ids.txt] [--config configs/identifiers.yaml] [K=64 ...]

Embeddings: .npy (N, D), .pt (tensor or {"embeddings", "item_ids"}), .parquet (embedding [+ item_id]).
Item ids: from the file if it has them, else --ids (one per line), else "0".."N-1".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ace.config import ConfigError, load_config
from .config import IdentifierConfig
from .id_table import IdTableError
from .inputs import IdentifierInputError, load_embeddings
from .semantic_ids import SemanticIdTokenizer, TokenizerFormatError
from .trie import TrieError


def format_summary(s: dict) -> str:
    lines = [f"items N               {s['N']}",
             f"collision rate        {100 * s['collision_rate']:.2f}% of items have u > 0",
             f"max u                 {s['max_u']}",
             f"distinct (k, v) prefixes {s['distinct_prefixes']}"]
    for lv in s["codebook_usage"]:
        lines.append(f"codebook usage {lv['level']:<6} {lv['used']}/{lv['size']} = {100 * lv['share']:.1f}%")
    rec = s.get("recon_error") or {}
    if rec:
        lines.append(f"reconstruction error  relative {rec['relative']:.4f}, mse {rec['mse']:.3e} (residuals)")
    t = s.get("times") or {}
    if t:
        lines.append("time                  " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


def build(args) -> int:
    config = load_config(IdentifierConfig, args.config, args.overrides)
    if config.vectors != "item":
        print(f"error: vectors={config.vectors} is built by the training pipeline (train.py), which has the "
              f"training queries; this command quantises the given embeddings (vectors=item)", file=sys.stderr)
        return 2
    emb, ids = load_embeddings(args.embeddings)
    if ids is None and args.ids:
        ids = [line.rstrip("\n") for line in Path(args.ids).read_text(encoding="utf-8").splitlines()]
    if ids is None:
        ids = [str(i) for i in range(emb.shape[0])] if getattr(emb, "ndim", 0) >= 1 else []
    t = time.time()
    tok = SemanticIdTokenizer.fit(emb, ids, config, device=args.device, progress=not args.quiet)
    out = tok.save(args.out)
    summary = tok.summary()
    summary["wall_s"] = time.time() - t
    print(format_summary(summary))
    print(f"saved to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m identifiers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fit K-Means + RQ-VAE and assign (k, v1..vM, u) to every item")
    b.add_argument("--embeddings", required=True, help=".npy / .pt / .parquet file of (N, D) embeddings")
    b.add_argument("--out", required=True, help="folder to save the tokenizer to")
    b.add_argument("--ids", help="text file of item ids, one per line (default: file's ids or 0..N-1)")
    b.add_argument("--config", help="YAML IdentifierConfig (default: built-in defaults)")
    b.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    b.add_argument("--json", help="also write the summary as JSON here")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. K=64 rqvae_max_steps=500")
    args = parser.parse_args(argv)
    try:
        return build(args)
    except (IdentifierInputError, ConfigError, IdTableError, TrieError, TokenizerFormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
