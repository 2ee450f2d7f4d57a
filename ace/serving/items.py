"""Add, delete and list a run's items from the command line, directly on RUN/store.sqlite.

    python -m ace.serving.items add --run RUN --file items.jsonl [--batch-size 100]
    python -m ace.serving.items delete --run RUN ID [ID ...]
    python -m ace.serving.items list --run RUN [--status active|deleted|all] [--source trained|added|folded]

``items.jsonl``: one item a line, the fields of ``POST /items``: ``item_id``, ``modality``, and an
``embedding`` (the run's dimension) or a ``media`` path inside the corpus root; optional
``captions`` and ``metadata``. Each batch is one transaction (all or none), committed before the
next starts; the identifiers assigned are printed as JSON lines.

The store is the run's ``store.url``: ``--store-url``, else $ACE_STORE_URL, else RUN/store.sqlite. A
running server on the same store applies the changes made here within its poll interval
(``store.poll_interval_s``, 0.2 s by default); the CLI and a server take turns on the store's write lock.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ace.serving.schemas import ItemsFormatError, items_from_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_items_file(path: Path) -> list:
    """JSON lines -> CorpusItems, with the line number in every error."""
    if not path.is_file():
        raise ItemsFormatError(f"items file not found: {path}")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ItemsFormatError(f"{path}:{n}: malformed JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ItemsFormatError(f"{path}:{n}: each line must be one item object")
        try:
            items += items_from_json(row)
        except ItemsFormatError as exc:
            raise ItemsFormatError(f"{path}:{n}: {exc}") from None
    if not items:
        raise ItemsFormatError(f"{path}: no items")
    return items


def cmd_add(args) -> int:
    from tqdm.auto import tqdm

    from ace.serving.retriever import Retriever

    items = read_items_file(args.file)
    retriever = Retriever.from_run(args.run, device=args.device, store_url=args.store_url)
    try:
        done = 0
        with tqdm(total=len(items), desc="add", unit="item", disable=args.quiet) as bar:
            for s in range(0, len(items), args.batch_size):
                batch = items[s:s + args.batch_size]
                for it, ident in zip(batch, retriever.add_items(batch)):
                    print(json.dumps({"item_id": it.item_id, "identifier": list(ident), "source": "added"}))
                done += len(batch)
                bar.update(len(batch))
    finally:
        retriever.close()
    print(f"added {done} item(s) to {args.run}", file=sys.stderr)
    return 0


def cmd_delete(args) -> int:
    from ace.serving.retriever import Retriever

    retriever = Retriever.from_run(args.run, device=args.device, store_url=args.store_url)
    try:
        n = retriever.delete_items(list(args.ids))
    finally:
        retriever.close()
    print(f"deleted {n} item(s) from {args.run}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from ace.serving.store import open_item_store, resolve_store_url, store_exists

    url = resolve_store_url(args.run, args.store_url)
    if not store_exists(url):
        print(f"{args.run} has no store.sqlite: no item was added or deleted since training", file=sys.stderr)
        return 0
    with open_item_store(url, create=False) as store:
        status = None if args.status == "all" else args.status
        for it in store.iterate(status=status, source=args.source):
            print(json.dumps({"item_id": it.item_id, "modality": it.modality, "source": it.source, "status": it.status,
                              "identifier": list(it.identifier) if it.identifier else None, "media": it.media,
                              "captions": it.captions}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ace.serving.items", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add items from a JSON-lines file")
    add.add_argument("--file", required=True, type=Path)
    add.add_argument("--batch-size", type=int, default=100, help="items per transaction")
    add.add_argument("--quiet", action="store_true")
    delete = sub.add_parser("delete", help="delete items by id (trained, added or folded)")
    delete.add_argument("ids", nargs="+")
    lst = sub.add_parser("list", help="items recorded in the store (added, folded, deleted)")
    lst.add_argument("--status", default="active", choices=["active", "deleted", "all"])
    lst.add_argument("--source", default=None, choices=["trained", "added", "folded"])
    for p in (add, delete, lst):
        p.add_argument("--run", required=True, type=Path, help="run folder written by train.py")
        p.add_argument("--store-url", default=None, help="the run's item store (sqlite:///... or postgresql://...); "
                                                          "default $ACE_STORE_URL, else RUN/store.sqlite")
    for p in (add, delete):
        p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    args = ap.parse_args(argv)
    if not args.run.is_dir():
        print(f"error: run folder not found: {args.run}", file=sys.stderr)
        return 2
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        return {"add": cmd_add, "delete": cmd_delete, "list": cmd_list}[args.command](args)
    except (ValueError, KeyError) as exc:  # ItemsFormatError, RetrieverError, StoreError: the message names the item
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
