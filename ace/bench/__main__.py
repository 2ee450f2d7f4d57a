"""``python -m ace.bench {quality,efficiency,profile} ...``: dispatch to the benchmark's own CLI."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"quality": "ace.bench.quality", "efficiency": "ace.bench.efficiency", "profile": "ace.bench.stage_profile"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: python -m ace.bench {{{','.join(COMMANDS)}}} [--help | options]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
