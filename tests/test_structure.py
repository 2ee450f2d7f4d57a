"""The code's shape: no import cycles among the project's modules (lazy imports inside functions
included), and no module much over 500 lines unless one idea needs the length (ALLOWED_LONG says why).

The import graph is read from the source with ``ast`` (nothing is imported): a module depends on
every project module named by an ``import`` or ``from ... import`` anywhere in its file, at top
level or inside a function. ``from pkg import name`` counts as a dependency on ``pkg.name`` when
that is a module, else on ``pkg``. A package's ``__init__`` is the package's own module.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ace", "identifiers", "querygen")
MAX_LINES = 500
# modules allowed over MAX_LINES, with the reason (one idea that needs the length)
ALLOWED_LONG = {
    "ace/data/encoders.py": "every item encoder (CLIP/CLAP, sentence-transformers, EfficientNet, aisfx, "
                            "precomputed) behind one build_encoder + its on-disk cache",
    "ace/bench/efficiency.py": "one benchmark protocol: build, time and size ACE vs dual-tower search "
                               "at growing corpus sizes",
    "ace/training/loop.py": "the training loop on accelerate: checkpoints, exact resume, export, and issue 19's "
                            "identifier-space pretraining",
    "ace/pipeline/stages.py": "the Pipeline's stages, one method each (grew with issue 19's stage options)",
    "ace/model/modeling.py": "AceModel: encoder, fused decoder, generation hooks and issue 19's prototype heads",
}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules that ``name`` (at ``path``) imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` of a non-module attribute path -> its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 40, f"only {len(graph)} modules found under {PACKAGES}: wrong root?"
    found = cycles(graph)
    assert not found, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in found)


def package_of(module: str) -> str:
    """ace.serving.retriever -> ace.serving; ace.config -> ace.config; identifiers.trie -> identifiers."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ace" else parts[0]


def test_packages_form_layers():
    """Between packages too, imports go one way (ace/serving never imports ace/pipeline, ...)."""
    packages: dict[str, set[str]] = {}
    for module, deps in import_graph(ROOT).items():
        packages.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    graph = {p: deps - {p} for p, deps in packages.items()}
    found = cycles(graph)
    assert not found, "packages importing each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_line_limit_without_a_reason():
    long = {}
    for p in module_files(ROOT).values():
        rel = p.relative_to(ROOT).as_posix()
        n = len(p.read_text().splitlines())
        if n > MAX_LINES and rel not in ALLOWED_LONG:
            long[rel] = n
    assert not long, f"modules over {MAX_LINES} lines (split them, or say in ALLOWED_LONG why one idea needs it): {long}"
    stale = [rel for rel in ALLOWED_LONG if not (ROOT / rel).is_file()
             or len((ROOT / rel).read_text().splitlines()) <= MAX_LINES]
    assert not stale, f"ALLOWED_LONG entries that no longer need the exception: {stale}"


def test_the_checker_finds_a_cycle_hidden_in_a_lazy_import(tmp_path):
    pkg = tmp_path / "pk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pk.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    import pk.a\n    return pk.a\n")
    (pkg / "d.py").write_text("from pk import a\nfrom . import c\n")
    graph = import_graph(tmp_path, ("pk",))
    assert graph["pk.sub.b"] == {"pk.c"} and graph["pk.d"] == {"pk.a", "pk.c"}
    assert cycles(graph) == [["pk.a", "pk.c", "pk.sub.b"]]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(tmp_path, ("pk",))) == []
