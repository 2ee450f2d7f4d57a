"""ACE training pipeline CLI.

    python train.py --config configs/demo.yaml [key=value ...]      # encode -> identifiers -> querygen -> train -> fallback -> eval -> report
    python train.py --config configs/demo.yaml --until identifiers  # stop after a stage
    python train.py --config configs/demo.yaml --force train        # re-run a stage (and the ones after it)
    python train.py fold --run runs/demo [steps=500 ...]             # fold items added since training into the model

Re-running the same command skips stages that are up to date and resumes training from the
last checkpoint; the run folder (``run_dir``) holds config, identifiers, model, metrics, report, plots.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fold_main(argv: list[str]) -> int:
    """``train.py fold``: fine-tune the run's model on its added items (ace/pipeline/fold.py)."""
    from ace.pipeline.fold import FoldConfig

    ap = argparse.ArgumentParser(prog="train.py fold", description="Fold the items added to a trained run "
                                 "(served by the fallback index) into its generative model.")
    ap.add_argument("--run", required=True, help="run folder written by train.py (run_dir)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--store-url", default=None, help="the run's item store, as the servers' store.url "
                    "(default $ACE_STORE_URL, else RUN/store.sqlite)")
    ap.add_argument("overrides", nargs="*", help=f"key=value FoldConfig settings: {', '.join(FoldConfig.__dataclass_fields__)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ace.config import load_config
    from ace.pipeline.fold import FoldError, fold_run

    try:
        cfg = load_config(FoldConfig, None, args.overrides + (["progress=false"] if args.quiet else []))
        if args.store_url:  # the run's item store for this process: the fold and its evaluations read it
            os.environ["ACE_STORE_URL"] = args.store_url
        result = fold_run(args.run, cfg)
    except (FoldError, ValueError, FileNotFoundError) as exc:  # ConfigError, store/retriever/training errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.message)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fold"]:
        return fold_main(argv[1:])
    ap = argparse.ArgumentParser(description="Train an ACE generative retriever end to end.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML config (configs/*.yaml)")
    ap.add_argument("--until", default="report", help="last stage to run: corpus, encode, querygen, identifiers, train, fallback, hybrid, eval, report")
    ap.add_argument("--force", default=None, help="re-run this stage and every later one")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (dotted for sections)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ace.config import ConfigError, load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import STAGES, Pipeline, PipelineError

    if args.until not in STAGES or (args.force and args.force not in STAGES):
        ap.error(f"stages are: {', '.join(STAGES)}")
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        forced = STAGES[STAGES.index(args.force):] if args.force else ()
        Pipeline(cfg, progress=not args.quiet, force=forced).run_all(until=args.until)
    except (ConfigError, PipelineError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
