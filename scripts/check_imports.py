"""Import every third-party module the project's code imports (found by reading its source), plus the
runtime packages it only reaches indirectly; exit 1 naming each one that fails.

    python scripts/check_imports.py

scripts/setup.sh runs it after installing, so a package that failed to install (or installed but
cannot be imported, e.g. a missing shared library) stops the setup with its name, instead of
surfacing later as an ImportError deep inside a pipeline stage or a test.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"ace", "identifiers", "querygen", "train", "serve", "tests", "benchmarks"}
# used at run time without an `import` in our code: transformers' GGUF loading, uvicorn's fast paths,
# FastAPI's multipart parsing
INDIRECT = ["gguf", "multipart", "httptools", "uvloop"]
# optional extras of pyproject.toml, not in the default install: reported, not required
OPTIONAL = {"llama_cpp": "ace[llama] (querygen.runtime=llama_cpp)",
            "onnxruntime": "ace[onnx] (serve.py --encoder-engine, ace.model.onnx_encoder, benchmarks/bench_onnx_engine.py)",
            "onnx": "ace[onnx] (ace.model.onnx_encoder: torch.onnx.export)"}


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one file importing it (lazy imports inside functions included)."""
    files = [p for d in ("ace", "identifiers", "querygen") for p in sorted((ROOT / d).rglob("*.py"))]
    files += [ROOT / "train.py", ROOT / "serve.py"]
    found: dict[str, str] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN:
                    found.setdefault(top, str(f.relative_to(ROOT)))
    return found


def main() -> int:
    modules = imported_modules()
    if sys.platform == "win32":
        INDIRECT.remove("uvloop")
    for name in INDIRECT:
        modules.setdefault(name, "(runtime dependency)")
    for name in OPTIONAL:   # some are imported by name (importlib), which the source scan does not see
        modules.setdefault(name, "(optional extra)")
    failed = []
    for name, where in sorted(modules.items()):
        if name in OPTIONAL:
            found = importlib.util.find_spec(name) is not None
            print(f"[setup] optional {name} for {OPTIONAL[name]}: {'installed' if found else 'not installed'}")
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install raising something else on import
            failed.append(f"  {name} (imported by {where}): {type(exc).__name__}: {exc}")
    if failed:
        print(f"[setup] {len(failed)} runtime import(s) fail:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    print(f"[setup] ok: all {len(modules)} runtime imports work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
