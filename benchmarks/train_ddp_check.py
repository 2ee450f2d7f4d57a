"""Same training code, 1 process vs 2 processes (DDP on CPU, gloo): do the metrics agree?

    python benchmarks/train_ddp_check.py [--steps 300] [--items 240] [--threads 1] [--seeds 0,1,2] [--out benchmarks/out/ddp_check]

Trains the synthetic task (ace/bench/synthetic.py) twice with identical TrainConfig (global batch 64,
so the step count and schedule are the same for both) and prints held-out Recall@k of each:

    1 process : python benchmarks/train_ddp_check.py --worker --run-dir OUT/1proc
    2 processes: accelerate launch --multi_gpu --num_processes 2 benchmarks/train_ddp_check.py --worker ...

(On a machine without GPUs ``--multi_gpu`` starts 2 torchrun workers that accelerate runs as
MULTI_CPU over gloo. ``accelerate launch --cpu --num_processes 2`` starts only ONE process with
accelerate 1.15 unless mpirun is used; the ``--probe`` step below shows what it starts.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One training run under whatever launcher started this process; main process writes result.json."""
    sys.path.insert(0, str(ROOT))
    import torch
    from accelerate import Accelerator

    from ace.bench.synthetic import make_synthetic_task, train_synthetic
    from ace.model.tokens import QueryTokenizer
    from ace.training.loop import TrainConfig
    from identifiers.semantic_ids import SemanticIdTokenizer

    accelerator = Accelerator(cpu=True)
    if args.probe:
        print(json.dumps({"probe": True, "process_index": accelerator.process_index,
                          "num_processes": accelerator.num_processes,
                          "distributed_type": str(accelerator.distributed_type)}), flush=True)
        return
    torch.set_num_threads(args.threads)
    task = make_synthetic_task(args.items, seed=0)
    artefacts = Path(args.artefacts)
    id_tok = SemanticIdTokenizer.load(artefacts / "identifiers")
    qtok = QueryTokenizer.load(artefacts / "query_tokenizer")
    cfg = TrainConfig(lr=5e-3, warmup_steps=50, batch_size=64, max_steps=args.steps, checkpoint_every=args.steps,
                      eval_every=0, num_beams=10, eval_top_k=10, log_every=50, seed=args.seed, omega=args.omega,
                      progress=False)
    t0 = time.time()
    result, _ = train_synthetic(task, args.run_dir, cfg, id_tokenizer=id_tok, query_tokenizer=qtok,
                                accelerator=accelerator, model_overrides={"dropout": args.dropout})
    if accelerator.is_main_process:
        losses = [r["loss"] for r in result.history if "loss" in r]
        out = {"seed": args.seed, "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
               "torch_threads_per_process": torch.get_num_threads(), "steps": result.step,
               "final_train_loss": losses[-1], "metrics": result.final_metrics, "seconds": time.time() - t0}
        Path(args.run_dir, "result.json").write_text(json.dumps(out, indent=1))
        print(json.dumps(out), flush=True)


def run(cmd: list[str], env: dict) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--items", type=int, default=240)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "ddp_check"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (same for both runs)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (init, dropout, batch order)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dropout", type=float, default=0.1, help="model dropout (0 with --omega 0: deterministic runs)")
    p.add_argument("--omega", type=float, default=0.15, help="R-Drop weight")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--artefacts", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = Path(args.out)
    script = str(Path(__file__).resolve())
    # identifiers + query tokenizer are fitted once, outside the distributed job (the pipeline's
    # identifier stage); both runs load the same artefacts
    sys.path.insert(0, str(ROOT))
    from ace.bench.synthetic import fit_synthetic_artefacts, make_synthetic_task

    id_tok, qtok = fit_synthetic_artefacts(make_synthetic_task(args.items, seed=0))
    id_tok.save(out / "artefacts" / "identifiers")
    qtok.save(out / "artefacts" / "query_tokenizer")
    common = ["--worker", "--steps", str(args.steps), "--items", str(args.items), "--threads", str(args.threads),
              "--artefacts", str(out / "artefacts"), "--dropout", str(args.dropout), "--omega", str(args.omega)]

    probe = run(["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", script, "--worker", "--probe"], env)
    started = [json.loads(line) for line in probe.splitlines() if line.startswith('{"probe"')]
    print(f"`accelerate launch --cpu --num_processes 2` started {len(started)} process(es): {started}")

    results = {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        for name, launcher in [
            ("1 process", [sys.executable]),
            ("2 processes (DDP, gloo)", ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]),
        ]:
            run_dir = out / f"{'2proc' if '2' in name else '1proc'}-seed{seed}"
            run(launcher + [script] + common + ["--seed", str(seed), "--run-dir", str(run_dir)], env)
            results[(name, seed)] = json.loads((run_dir / "result.json").read_text())

    from safetensors.torch import load_file

    def max_param_diff(seed: int) -> float:
        a = load_file(out / f"1proc-seed{seed}" / "model" / "model.safetensors")
        b = load_file(out / f"2proc-seed{seed}" / "model" / "model.safetensors")
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    print()
    print(f"synthetic task: {args.items} items, {args.steps} steps, global batch 64, dropout {args.dropout}, "
          f"omega {args.omega}, {args.threads} torch thread(s) per process, held-out paraphrase queries, "
          f"constrained beam search (10 beams)")
    print("| run | seed | processes | steps | final train loss | R@1 | R@5 | R@10 | MRR@10 | max abs param diff vs 1 process | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, seed), r in results.items():
        m = r["metrics"]
        diff = f"{max_param_diff(seed):.2e}" if name.startswith("2") else "-"
        print(f"| {name} | {seed} | {r['num_processes']} ({r['distributed_type']}) | {r['steps']} | {r['final_train_loss']:.4f} "
              f"| {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['MRR@10']:.2f} | {diff} | {r['seconds']:.1f} |")
    for (name, seed), r in results.items():
        if name.startswith("2") and r["num_processes"] != 2:
            raise SystemExit(f"the 2-process launch ran {r['num_processes']} process(es)")


if __name__ == "__main__":
    main()
