"""Console commands (`ace-train`, `ace-serve`, `ace-bench`, `ace-items`, `ace-identifiers`): the
pyproject table names callables that exist and answer --help; once installed (`pip install -e .`,
scripts/setup.sh) the commands themselves run."""
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"ace-train", "ace-serve", "ace-bench", "ace-items", "ace-identifiers"}


def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_pyproject_declares_the_console_commands():
    assert set(scripts()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_point_target_answers_help(name, capsys):
    module, _, attr = scripts()[name].partition(":")
    main = getattr(importlib.import_module(module), attr)
    try:
        code = main(["--help"])
    except SystemExit as exc:  # argparse exits after printing the help
        code = exc.code
    out = capsys.readouterr()
    assert code in (0, None)
    assert "usage" in (out.out + out.err).lower()


def test_bad_arguments_give_a_usage_error_not_a_traceback(capsys):
    module, _, attr = scripts()["ace-bench"].partition(":")
    assert getattr(importlib.import_module(module), attr)(["nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err


def _installed_scripts() -> dict[str, str]:
    try:
        dist = importlib.metadata.distribution("ace-retrieval")
    except importlib.metadata.PackageNotFoundError:
        return {}
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def test_installed_commands_run():
    installed = _installed_scripts()
    if not installed:
        pytest.skip("ace-retrieval is not installed with its console commands here: `pip install -e .` "
                    "(scripts/setup.sh does) installs them")
    assert installed == scripts()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in sorted(EXPECTED):
        exe = bindir / name
        assert exe.is_file(), f"{name} is declared but not installed in {bindir}"
        proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "usage" in (proc.stdout + proc.stderr).lower()
