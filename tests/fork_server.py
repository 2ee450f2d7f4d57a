"""A pre-imported Python that forks one child per command line, for tests that start many short-lived
processes (the kill -9 crash matrix): each child skips the interpreter start-up and the imports
(torch, transformers, the serving stack: seconds per process on a shared CPU) and runs the same
``main(argv)`` as ``python -m ace.serving.items ...``, ``python serve.py ...`` or ``python train.py ...``.

The parent imports and never runs torch ops or starts threads (so forking it is safe), then answers
JSON lines on stdin, one answer line each on stdout:

    {"start": "items"|"serve"|"train", "argv": [...], "out": FILE, "err": FILE} -> {"pid": PID}
    {"wait": PID, "timeout": SECONDS}       -> {"pid": PID, "returncode": RC}  (RC None: still running;
                                               -9 when it was killed by SIGKILL, as subprocess reports it)

A child writes its stdout (line-buffered, like a terminal: every printed line is visible at once) and
stderr to the given files. Kill a child by its pid (``os.kill(pid, SIGKILL)``); this server reaps it.
Used through ``ForkServer`` below.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _entry(name: str):
    if name == "items":
        from ace.serving.items import main
    elif name == "serve":
        from serve import main
    elif name == "train":
        from train import main
    else:
        raise ValueError(f"unknown entry point {name!r}")
    return main


def _preload() -> None:
    """Everything the three entry points import on their way to work, imported once here."""
    import torch  # noqa: F401

    import ace.pipeline.fold  # noqa: F401
    import ace.pipeline.stages  # noqa: F401
    import ace.serving.items  # noqa: F401
    import ace.serving.retriever  # noqa: F401
    import ace.serving.server  # noqa: F401
    import ace.training.loop  # noqa: F401
    import serve  # noqa: F401
    import train  # noqa: F401
    import uvicorn  # noqa: F401


def _child(cmd: dict) -> None:
    """In the forked child: redirect stdio, run the entry point, exit with its code (never returns)."""
    code = 1
    try:
        os.setpgid(0, 0)
        try:  # Linux: die with this server even when it is killed
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        fd_in = os.open(os.devnull, os.O_RDONLY)
        fd_out = os.open(cmd["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fd_err = os.open(cmd["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = [cmd["start"], *cmd["argv"]]
        code = _entry(cmd["start"])(list(cmd["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code or 0))


def serve_forever() -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    _preload()
    children: dict[int, int | None] = {}
    out = sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if "start" in cmd:
            out.flush()
            pid = os.fork()
            if pid == 0:
                _child(cmd)
            children[pid] = None
            answer = {"pid": pid}
        else:
            pid, deadline = int(cmd["wait"]), time.monotonic() + float(cmd.get("timeout", 0))
            while children.get(pid) is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children[pid] = os.waitstatus_to_exitcode(status)
                elif time.monotonic() >= deadline:
                    break
                else:
                    time.sleep(0.01)
            answer = {"pid": pid, "returncode": children.get(pid)}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    for pid, code in children.items():  # stdin closed (the test ended or died): no child outlives this server
        if code is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    os._exit(0)  # skips tearing down torch & co. (seconds on a busy machine)


class ForkServer:
    """The test side: ``start`` a command, ``wait`` for it (or time out), ``kill`` it with SIGKILL."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.running: set[int] = set()  # started, not yet reaped: their pids cannot be reused meanwhile

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server exited (code {self.proc.wait()})")
        return json.loads(line)

    def start(self, entry: str, argv: list[str], out: Path, err: Path) -> int:
        pid = self._ask({"start": entry, "argv": [str(a) for a in argv], "out": str(out), "err": str(err)})["pid"]
        self.running.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = 0.0) -> int | None:
        code = self._ask({"wait": pid, "timeout": timeout})["returncode"]
        if code is not None:
            self.running.discard(pid)
        return code

    def kill(self, pid: int) -> int:
        """SIGKILL the child (if it still runs) and reap it: its return code (-9 when the kill landed)."""
        if pid not in self.running:
            raise ValueError(f"{pid} is not a running child of this fork server")
        os.kill(pid, signal.SIGKILL)  # not reaped yet, so still our child (or its zombie)
        code = self.wait(pid, 60)
        if code is None:
            raise RuntimeError(f"child {pid} survived SIGKILL for 60 s")
        return code

    def close(self) -> None:
        for pid in list(self.running):
            self.kill(pid)
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


if __name__ == "__main__":
    serve_forever()
