"""CLI: ``python -m querygen --corpus CORPUS --backend NAME --out DIR [--config YAML] [key=value ...]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ace.config import ConfigError, load_config

from . import QueryGenConfig, QueryGenError, build_backend, run_querygen
from .corpus_file import read_corpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m querygen", description=__doc__)
    ap.add_argument("--corpus", required=True, help="JSONL/CSV corpus file, or a caption file (see --format)")
    ap.add_argument("--format", default=None, help="caption-file format for ace.data.importers (e.g. audiocaps, clotho)")
    ap.add_argument("--backend", default=None, help="captions | mllm | paraphrase | template")
    ap.add_argument("--out", required=True, help="output folder (dataset, cache.jsonl, summary.json)")
    ap.add_argument("--config", default=None, help="YAML file with QueryGenConfig keys")
    ap.add_argument("overrides", nargs="*", help="QueryGenConfig key=value overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"backend={args.backend}"] if args.backend else [])
    try:
        config = load_config(QueryGenConfig, args.config, overrides)
        items, root = read_corpus(args.corpus, args.format, limit=config.limit)
        if config.media_root is None:  # relative media paths resolve against the corpus root (its folder)
            config.media_root = str(root if root is not None else Path(args.corpus).resolve().parent)
        summary = run_querygen(items, build_backend(config), config=config, out_dir=args.out)
    except (QueryGenError, ConfigError) as exc:
        print(f"querygen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"querygen: interrupted; finished items are in the cache under {args.out}, rerun to resume",
              file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
