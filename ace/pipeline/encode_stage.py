"""The encode stage, data-parallel: the corpus cut into shards of whole encoder batches, the shards
encoded by N processes, merged in corpus order into RUN/embeddings.npy.

The processes are either started by the stage (``encode.processes=N``: N workers ``python -m
ace.pipeline.encode_stage --run RUN --rank r``) or are the ranks of a multi-process launch
(``accelerate launch --multi_gpu --num_processes N train.py ...`` or ``torchrun --nproc_per_node N
train.py ...``: ``Launch``). Rank r encodes the contiguous block of shards ``plan.owned(r)``.

Same bytes as one process: a shard is a run of whole batches of ``MultiModalEncoder.plan`` (the
batches a single process encodes), each shard keeps its modality encoders' raw unit rows, and the
merge projects every modality's rows at once exactly as ``MultiModalEncoder.encode`` does. Float
results depend on the batch and on the intra-op thread count, so every worker runs with the
launching process's thread count (``encode.threads`` overrides it; torchrun sets 1).

RUN/encode_shards/ (``RunPaths.encode_shards``), removed once the stage is done:
    plan.json          digest (stage key, item ids, batches, shard ranges), processes, encoder config
    shard-00000.npz    rows_<modality> (corpus rows) + emb_<modality> (raw unit rows) of the shard
    shard-00000.json   its manifest, written after the .npz: shard, batches, items, plan digest, sha256
    worker-<r>.log     what a worker started by the stage printed
Every file is written to a temp file and renamed. A shard is complete when its manifest names the
plan's digest and the sha256 of its .npz; a re-run after a kill encodes only the other shards, and a
manifest whose data do not match is a clear error (never silently merged).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ace.config import config_hash, from_dict, to_dict
from ace.data.encoders import EncoderError, MultiModalEncoder, MultiModalEncoderConfig
from ace.pipeline.launch import Launch, pick_gpu
from ace.run_folder import RunPaths, load_run_corpus, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]


class EncodeError(RuntimeError):
    """The data-parallel encode cannot go on (bad process count, corrupt or missing shard, a worker
    failed); the message names the file, shard or worker."""


@dataclass
class EncodeConfig:
    """How the encode stage runs (not what it computes: not part of the stage key)."""
    processes: int = 1          # worker processes the stage starts (1: encode in the pipeline's own process)
    shard_batches: int = 8      # encoder batches per shard, the unit of resume (more shards when processes need them)
    threads: int = 0            # intra-op threads per worker; 0 = the launching process's (same bytes as one process with it)

    def __post_init__(self):
        if self.processes < 1 or self.shard_batches < 1 or self.threads < 0:
            raise ValueError(f"encode: processes and shard_batches must be >= 1 and threads >= 0, got "
                             f"processes={self.processes}, shard_batches={self.shard_batches}, threads={self.threads}")


# ----------------------------------------------------------------------------- the plan


@dataclass
class ShardPlan:
    key: str                                  # the encode stage key
    digest: str                               # of key, item ids, batches and shard ranges
    batches: list[tuple[str, list[int]]]      # MultiModalEncoder.plan
    shards: list[tuple[int, int]]             # [first batch, end batch) per shard, contiguous, in order
    world: int                                # processes

    def owned(self, rank: int) -> list[int]:
        """The contiguous block of shards that process ``rank`` encodes."""
        s = len(self.shards)
        return list(range(rank * s // self.world, (rank + 1) * s // self.world))

    def shard_batches(self, shard: int) -> list[tuple[str, list[int]]]:
        b0, b1 = self.shards[shard]
        return self.batches[b0:b1]


def make_plan(items, enc_cfg: MultiModalEncoderConfig, key: str, *, world: int, shard_batches: int,
              shards: list | None = None) -> ShardPlan:
    """The shards of ``items``: ceil(batches / shard_batches) runs of whole batches (at least ``world``);
    ``shards``: the ranges a plan.json recorded instead."""
    batches = [(m, list(rows)) for m, rows in MultiModalEncoder(enc_cfg).plan(items)]
    if world > len(items):
        raise EncodeError(f"encode: {world} processes for {len(items)} items; use at most {len(items)} processes")
    if world > len(batches):
        sizes = ", ".join(f"{m} {getattr(enc_cfg, m).batch_size}" for m in dict.fromkeys(m for m, _ in batches))
        raise EncodeError(f"encode: {world} processes but the {len(items)} items make only {len(batches)} encoder "
                          f"batches (batch sizes: {sizes}); every process needs a whole batch: use at most "
                          f"{len(batches)} processes or a smaller encoder batch_size")
    if shards is None:
        n = max(world, -(-len(batches) // shard_batches))
        shards = [(i * len(batches) // n, (i + 1) * len(batches) // n) for i in range(n)]
    shards = [(int(a), int(b)) for a, b in shards]
    digest = config_hash(key, [it.item_id for it in items], batches, shards)
    return ShardPlan(key=key, digest=digest, batches=batches, shards=shards, world=world)


# ----------------------------------------------------------------------------- shard files


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: in blocks
            return hashlib.file_digest(f, "sha256").hexdigest()
        return hashlib.sha256(f.read()).hexdigest()


class ShardFolder:
    """RUN/encode_shards: the plan, shard data + manifests, worker logs."""

    def __init__(self, run_dir: str | Path):
        self.path = RunPaths(run_dir).encode_shards

    def data(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.npz"

    def manifest(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.json"

    def log(self, rank: int) -> Path:
        return self.path / f"worker-{rank}.log"

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    def read_plan(self) -> dict | None:
        try:
            return json.loads(self.plan_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def complete(self, plan: ShardPlan, shard: int) -> bool:
        """True when the shard is written for this plan; False when it is not written (a kill before its
        manifest); EncodeError when its manifest and data disagree."""
        man, data = self.manifest(shard), self.data(shard)
        if not man.is_file():
            return False
        fix = f"delete {man.name} and {data.name} to encode that shard again"
        try:
            rec = json.loads(man.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EncodeError(f"corrupt shard manifest {man}: {exc}; {fix}") from None
        if not isinstance(rec, dict) or rec.get("plan") != plan.digest or rec.get("shard") != shard:
            raise EncodeError(f"corrupt shard manifest {man}: it does not describe shard {shard} of plan "
                              f"{plan.digest}; {fix}")
        if not data.is_file():
            raise EncodeError(f"corrupt shard {shard}: {data} is missing but {man.name} says it was written; {fix}")
        if _sha256(data) != rec.get("sha256"):
            raise EncodeError(f"corrupt shard file {data}: its sha256 is not the one {man.name} recorded; {fix}")
        return True

    def prepare(self, plan: ShardPlan, enc_cfg: MultiModalEncoderConfig, threads: int) -> list[int]:
        """Before any worker starts: drop shards of another plan and torn temp files, check the complete
        shards, write plan.json; returns the complete shards."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.read_plan()
        if old is not None and old.get("digest") != plan.digest:
            stale = list(self.path.glob("shard-*"))
            if stale:
                print(f"[encode] corpus, encoder or shard plan changed: discarding {len(stale) // 2} shard(s) of plan "
                      f"{old.get('digest')}")
            for f in stale:
                f.unlink()
        for f in self.path.glob(".*.tmp*"):
            f.unlink()
        done = [s for s in range(len(plan.shards)) if self.complete(plan, s)]
        write_json_atomic(self.plan_file, {"digest": plan.digest, "key": plan.key, "processes": plan.world,
                                           "threads": threads, "shards": plan.shards,
                                           "encoder": to_dict(enc_cfg)})
        return done

    def write(self, plan: ShardPlan, shard: int, raw: dict[str, tuple[list[int], np.ndarray]], *, rank: int,
              seconds: float) -> None:
        """The shard's data (temp file + rename), then its manifest (temp file + rename)."""
        arrays = {}
        for m, (rows, emb) in raw.items():
            arrays[f"rows_{m}"] = np.asarray(rows, dtype=np.int64)
            arrays[f"emb_{m}"] = emb
        data = self.data(shard)
        tmp = self.path / f".{data.name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
        b0, b1 = plan.shards[shard]
        write_json_atomic(self.manifest(shard), {
            "shard": shard, "plan": plan.digest, "batches": [b0, b1],
            "items": int(sum(len(r) for r, _ in raw.values())), "sha256": _sha256(data), "rank": rank,
            "pid": os.getpid(), "seconds": round(seconds, 3), "written": time.time()})

    def read(self, plan: ShardPlan, shard: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{modality: (corpus rows, raw unit rows)} of a complete shard, checked against the plan."""
        if not self.complete(plan, shard):
            raise EncodeError(f"shard {shard} of {len(plan.shards)} was never written ({self.manifest(shard)} is "
                              f"missing): a process did not finish its shards; re-run the same command to encode it")
        data = self.data(shard)
        expect: dict[str, list[int]] = {}
        for m, rows in plan.shard_batches(shard):
            expect.setdefault(m, []).extend(rows)
        try:
            with np.load(data, allow_pickle=False) as z:
                got = {m: (z[f"rows_{m}"], z[f"emb_{m}"]) for m in expect}
        except (OSError, ValueError, KeyError) as exc:
            raise EncodeError(f"corrupt shard file {data}: {exc}; delete it and {self.manifest(shard).name} "
                              f"to encode that shard again") from None
        for m, rows in expect.items():
            if got[m][0].tolist() != rows or got[m][1].ndim != 2 or len(got[m][1]) != len(rows):
                raise EncodeError(f"corrupt shard file {data}: its {m} rows are not the plan's; delete it and "
                                  f"{self.manifest(shard).name} to encode that shard again")
        return got

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------- encoding and merging


def encode_shards(run_dir, plan: ShardPlan, shards: list[int], encoder: MultiModalEncoder, corpus, *,
                  rank: int = 0, stop=None) -> list[int]:
    """Encode the shards of ``shards`` that are not complete, in order; returns the ones encoded.
    ``stop()`` is asked before each batch: True ends the work (a worker whose parent died)."""
    folder = ShardFolder(run_dir)
    done = []
    for s in shards:
        if folder.complete(plan, s):
            continue
        t = time.time()
        pieces: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for m, rows in plan.shard_batches(s):
            if stop is not None and stop():
                return done
            emb = encoder.encode_batch([corpus.items[i] for i in rows], m, root=corpus.root)
            got = pieces.setdefault(m, ([], []))
            got[0].extend(rows)
            got[1].append(emb)
        folder.write(plan, s, {m: (r, np.concatenate(e)) for m, (r, e) in pieces.items()}, rank=rank,
                     seconds=time.time() - t)
        done.append(s)
        print(f"[encode] rank {rank}: shard {s + 1}/{len(plan.shards)} written ({time.time() - t:.1f}s)", flush=True)
    return done


def merge_shards(run_dir, plan: ShardPlan, enc_cfg: MultiModalEncoderConfig, n_items: int) -> np.ndarray:
    """Every shard of the plan -> float32 (N, D) in corpus order, projected as MultiModalEncoder.encode does."""
    folder = ShardFolder(run_dir)
    pieces: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for s in range(len(plan.shards)):
        for m, (rows, emb) in folder.read(plan, s).items():
            got = pieces.setdefault(m, ([], []))
            got[0].append(rows)
            got[1].append(emb)
    raw = {m: (np.concatenate(r).tolist(), np.concatenate(e)) for m, (r, e) in pieces.items()}
    if sum(len(r) for r, _ in raw.values()) != n_items:
        raise EncodeError(f"the shards hold {sum(len(r) for r, _ in raw.values())} rows for {n_items} items")
    return MultiModalEncoder(enc_cfg).project(n_items, raw)


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- workers started by the stage


def run_workers(run_dir, plan: ShardPlan, *, threads: int, progress: bool = True) -> None:
    """Start ``plan.world`` worker processes, wait for them; EncodeError naming the first that failed
    (the others are stopped; the shards they finished are kept for the next run)."""
    folder = ShardFolder(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    procs, logs = [], []
    try:
        for r in range(plan.world):
            log = open(folder.log(r), "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "ace.pipeline.encode_stage", "--run", str(run_dir),
                                           "--rank", str(r), "--parent", str(os.getpid())],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        shown = -1
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            n = sum(folder.manifest(s).is_file() for s in range(len(plan.shards)))
            if progress and n != shown:
                print(f"[encode] {n}/{len(plan.shards)} shards written by {plan.world} processes", flush=True)
                shown = n
            time.sleep(0.5)
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            r = failed[0]
            lines = folder.log(r).read_text(errors="replace").strip().splitlines()
            said = [ln for ln in lines if ln.startswith("error: ")][-1:] or lines[-5:]  # its message, else its last lines
            raise EncodeError(f"encode worker {r} of {plan.world} failed (exit code {procs[r].returncode}; its log: "
                              f"{folder.log(r)}): " + " / ".join(said))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()


def worker_main(argv: list[str] | None = None) -> int:
    """One worker started by ``run_workers``: encode the shards of its rank named in RUN/encode_shards/plan.json."""
    ap = argparse.ArgumentParser(prog="python -m ace.pipeline.encode_stage",
                                 description="An encode worker (started by the encode stage; not for direct use).")
    ap.add_argument("--run", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0, help="stop when this process is gone")
    args = ap.parse_args(argv)
    folder = ShardFolder(args.run)
    saved = folder.read_plan()
    if saved is None:
        print(f"error: {folder.plan_file} is missing or not JSON", file=sys.stderr)
        return 2
    try:
        enc_cfg = from_dict(MultiModalEncoderConfig, saved["encoder"], prefix="encoder.")
        corpus = load_run_corpus(args.run, RunPaths.CORPUS_TRAIN)
        plan = make_plan(corpus.items, enc_cfg, saved["key"], world=saved["processes"], shard_batches=1,
                         shards=saved["shards"])
        if plan.digest != saved["digest"]:
            raise EncodeError(f"{folder.plan_file} does not match the run's corpus and encoder config "
                              f"(the run folder changed after the stage planned the shards)")
        _set_threads(int(saved.get("threads") or 0))
        pick_gpu(args.rank)
        parent_gone = (lambda: os.getppid() != args.parent) if args.parent else None
        encode_shards(args.run, plan, plan.owned(args.rank), MultiModalEncoder(enc_cfg), corpus, rank=args.rank,
                      stop=parent_gone)
    except (EncodeError, EncoderError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- the stage


class EncodeStage:
    """The encode stage of one run: plan, shards by one process, N workers or the ranks of a launch, merge."""

    def __init__(self, run_dir, enc_cfg: MultiModalEncoderConfig, cfg: EncodeConfig, key: str, *,
                 launch: Launch | None = None, progress: bool = True):
        self.run_dir, self.enc_cfg, self.cfg, self.key = Path(run_dir), enc_cfg, cfg, key
        self.launch = launch or Launch({})
        self.progress = progress
        self.folder = ShardFolder(run_dir)
        if self.launch.world > 1 and cfg.processes > 1:
            raise EncodeError(f"encode.processes={cfg.processes} inside a launch of {self.launch.world} processes: "
                              f"the ranks of the launch are the encode processes; drop encode.processes")

    @property
    def world(self) -> int:
        return self.launch.world if self.launch.world > 1 else self.cfg.processes

    @property
    def threads(self) -> int:
        import torch

        return self.cfg.threads or torch.get_num_threads()

    def plan(self, corpus) -> ShardPlan:
        return make_plan(corpus.items, self.enc_cfg, self.key, world=self.world, shard_batches=self.cfg.shard_batches)

    def run(self, corpus) -> tuple[np.ndarray, dict]:
        """This process's part (rank 0 of a launch, or the only process): plan, encode, merge -> (N x D, info)."""
        plan = self.plan(corpus)
        reused = self.folder.prepare(plan, self.enc_cfg, self.threads)
        if reused:
            print(f"[encode] resuming: {len(reused)} of {len(plan.shards)} shards already written")
        t = time.time()
        if self.launch.world > 1:
            self.launch.tell({"plan": plan.digest})
            self._encode_own(plan, corpus)
            self.launch.barrier()  # every rank has written its shards (or failed)
        elif plan.world > 1:
            run_workers(self.run_dir, plan, threads=self.threads, progress=self.progress)
        else:
            encode_shards(self.run_dir, plan, plan.owned(0), MultiModalEncoder(self.enc_cfg), corpus)
        seconds = time.time() - t
        emb = merge_shards(self.run_dir, plan, self.enc_cfg, len(corpus.items))
        return emb, {"processes": plan.world, "shards": len(plan.shards), "shards_reused": len(reused),
                     "threads_per_process": self.threads, "seconds_encoding": round(seconds, 3)}

    def follow(self, load_corpus) -> bool:
        """A rank > 0 of a launch: wait for rank 0 (its corpus stage and plan), encode this rank's shards,
        meet at the barrier. False when rank 0 had nothing to encode."""
        told = self.launch.hear()
        if told.get("error"):
            raise EncodeError(f"rank 0 stopped: {told['error']}")
        if "plan" not in told:
            return False
        corpus = load_corpus()
        plan = self.plan(corpus)
        if told["plan"] != plan.digest:
            raise EncodeError(f"rank {self.launch.rank} planned shards {plan.digest} but rank 0 planned "
                              f"{told['plan']}: the ranks see different corpus or encoder configs")
        self._encode_own(plan, corpus)
        self.launch.barrier()
        return True

    def _encode_own(self, plan: ShardPlan, corpus) -> None:
        _set_threads(self.cfg.threads)
        encode_shards(self.run_dir, plan, plan.owned(self.launch.rank), MultiModalEncoder(self.enc_cfg), corpus,
                      rank=self.launch.rank)


if __name__ == "__main__":
    sys.exit(worker_main())
