"""Serve a trained run over HTTP (search API + search page).

    python serve.py --run RUN_DIR [--host 127.0.0.1 --port 8000] [--config serve.yaml] [max_batch=64 ...]

Settings are ``ace.config.ServeConfig`` fields: from ``--config`` YAML, then ``key=value``
overrides (e.g. ``store.url=postgresql://...`` for replicas sharing one item store, docs/SCALING.md),
then ``--host``/``--port``. Write endpoints need an API key (``api_key=...`` or the
``ACE_API_KEY`` environment variable). See docs/serving.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from ace.config import ConfigError, ServeConfig, load_config


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder written by train.py")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", default=None, type=int, help="port (default 8000)")
    p.add_argument("--config", default=None, type=Path, help="YAML file of ServeConfig fields")
    p.add_argument("--device", default=None, help="torch device for the model (default: cuda if available, else cpu)")
    p.add_argument("--quantize", action="store_true", help="dynamic int8 quantisation of the model (CPU)")
    p.add_argument("--encoder-engine", default="torch", choices=["torch", "ort-fp32", "ort-int8"],
                   help="run the query encoder (a pretrained BERT) on ONNX Runtime, CPU only; needs the extra "
                        "ace-retrieval[onnx]. ort-fp32: the same outputs, faster; ort-int8: faster still, "
                        "small quality cost (BENCHMARKS.md, 'CPU inference engines')")
    p.add_argument("--media-root", default=None, type=Path, help="folder media are served from (default: the run's corpus root)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("overrides", nargs="*", help="ServeConfig overrides, key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"host={args.host}")
    if args.port is not None:
        overrides.append(f"port={args.port}")
    try:
        config = load_config(ServeConfig, args.config, overrides)
    except ConfigError as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    if not args.run.is_dir():
        print(f"serve.py: run folder not found: {args.run}", file=sys.stderr)
        return 2
    if not _is_loopback(config.host) and not (config.read_requires_key and config.resolved_api_key()):
        logging.warning("serving on %s with open reads: anyone who can reach it can search and fetch media", config.host)

    import uvicorn

    from ace.serving.retriever import Retriever
    from ace.serving.server import create_app

    if config.torch_threads:
        import torch
        torch.set_num_threads(config.torch_threads)

    try:
        retriever = Retriever.from_run(args.run, device=args.device, quantize=args.quantize, store_url=config.store.url,
                                       encoder_engine=args.encoder_engine)
        app = create_app(retriever, config, media_root=args.media_root)
    except ValueError as exc:  # RetrieverError (incomplete run), missing media root, ...
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    logging.info("serving %s on http://%s:%d (search page at /, API docs at /docs)", args.run, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
