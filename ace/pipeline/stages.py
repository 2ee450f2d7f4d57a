"""The training pipeline: corpus -> encode -> querygen -> identifiers -> train -> fallback -> evaluate -> report.

Each stage writes its artefact into the run folder and a marker keyed by the hash of its config
and of the keys of the stages it reads; a re-run skips stages that are up to date and resumes
training from its last checkpoint. ``train.py`` is the command-line front of this module.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ace.arrays import resolve_device
from ace.config import config_hash, save_config, to_dict
from ace.data.corpus import Corpus, corpus_from_captions, load_corpus
from ace.metrics import retrieval_metrics
from ace.model.config import ace_model_config
from ace.pipeline.encode_stage import EncodeError, EncodeStage
from ace.pipeline.launch import Launch, LaunchError, run_launched
from ace.pipeline.query_pairs import QueryPairsError, base_first
from ace.pipeline.query_pairs import hold_out_pairs as _hold_out_pairs
from ace.pipeline.run_config import CorpusConfig, EvalConfig, PretrainConfig, RunConfig, SplitConfig
from ace.run_folder import (RunFolder, RunPaths, load_run_corpus, load_run_embeddings, read_pairs, read_query_origins,
                            write_json_atomic, write_npy_atomic, write_pairs)
from identifiers import SemanticIdTokenizer

log = logging.getLogger("ace.pipeline.stages")
ROOT = Path(__file__).resolve().parents[2]
STAGES = ("corpus", "encode", "querygen", "identifiers", "train", "fallback", "hybrid", "eval", "report")


class PipelineError(RuntimeError):
    """A stage cannot run with the given inputs; the message says which and why."""


# ----------------------------------------------------------------------------- helpers


# fields added to a config section after run folders were made: left out of the stage keys while they
# keep their default, so those runs stay up to date
ADDED_FIELDS = {"identifiers": ("vectors", "query_encoder"), "model": ("prototype_levels", "prototype_scale"),
                "querygen": ("runtime", "keep_captions", "llama_batch", "llama_requantize")}


def section_key(section, name: str) -> dict:
    """The config section as a dict for a stage key, without the ADDED_FIELDS at their defaults."""
    d, default = to_dict(section), to_dict(type(section)())
    return {k: v for k, v in d.items() if k not in ADDED_FIELDS.get(name, ()) or v != default[k]}


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("ace_make_demo", ROOT / "data" / "make_demo.py")
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # dataclasses look their module up while the module executes
    spec.loader.exec_module(mod)
    return mod


def load_source_corpus(cfg: CorpusConfig) -> Corpus:
    """The corpus named by the config: the demo, a corpus table, or a public caption file."""
    if cfg.demo:
        demo = _load_demo_module()
        out = Path(cfg.demo_dir)
        out = out if out.is_absolute() else ROOT / out
        if not (out / "corpus.jsonl").is_file():
            log.info("making the demonstration corpus in %s", out)
            demo.make_demo(demo.DemoConfig(out=str(out), seed=cfg.demo_seed))
        corpus = load_corpus(out / "corpus.jsonl", root=out)
    elif not cfg.path:
        raise PipelineError("no corpus: set corpus.path=FILE (a corpus table or a caption file) or corpus.demo=true")
    elif cfg.format == "table" or (cfg.format == "auto" and Path(cfg.path).suffix.lower() in (".jsonl", ".parquet")):
        corpus = load_corpus(cfg.path, root=cfg.root)
    else:
        corpus = corpus_from_captions(cfg.path, None if cfg.format == "auto" else cfg.format, media_root=cfg.root)
    items = [it for it in corpus.items if len(it.captions) >= cfg.min_captions]
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise PipelineError(f"the corpus {cfg.path or cfg.demo_dir} has no items with >= {cfg.min_captions} captions")
    return Corpus(items=items, root=corpus.root, source=corpus.source)


def split_captions(corpus: Corpus, split: SplitConfig) -> tuple[Corpus, list[tuple[str, str]]]:
    """(training corpus whose items keep only non-test captions, held-out (query, item_id) pairs)."""
    train_items, test_pairs = [], []
    for it in corpus.items:
        n = len(it.captions)
        held = sorted({i % n for i in split.test_captions if -n <= i < n}) if n else []
        if n and len(held) == n:
            raise PipelineError(f"item {it.item_id!r}: all its {n} captions are test captions; "
                                f"nothing is left for the item document or training queries")
        test_pairs += [(it.captions[i], it.item_id) for i in held]
        keep = [c for i, c in enumerate(it.captions) if i not in held]
        train_items.append(dataclasses.replace(it, captions=keep))
    return Corpus(items=train_items, root=corpus.root, source=corpus.source), test_pairs


def _norm_caption(text: str) -> str:
    return " ".join(text.lower().split())


def pretraining_texts(cfg: PretrainConfig, evaluated: str | Path | None, exclude, *, seed: int = 0) -> list[str]:
    """Distinct caption texts of ``cfg.files`` for identifier-space pretraining: never from the
    ``evaluated`` caption file, never one of ``exclude`` (the run's own captions, compared lower-cased
    with spaces collapsed); a seeded random sample of at most ``cfg.max_texts``."""
    from ace.data.importers import CaptionFileError, read_captions

    banned = {_norm_caption(t) for t in exclude}
    own = Path(evaluated).resolve() if evaluated else None
    texts: dict[str, str] = {}
    for f in cfg.files:
        path = Path(f)
        if own is not None and path.resolve() == own:
            raise PipelineError(f"pretrain.files names the evaluated caption file {f}: pretraining must use other files")
        try:
            items = read_captions(path)
        except CaptionFileError as exc:
            raise PipelineError(f"pretrain.files: {exc}") from None
        for it in items:
            for c in it.captions:
                key = _norm_caption(c)
                if key and key not in banned:
                    texts.setdefault(key, c.strip())
    if not texts:
        raise PipelineError(f"pretrain.files {cfg.files} give no caption that is not one of the run's own")
    out = list(texts.values())
    rng = np.random.default_rng(seed)
    if len(out) > cfg.max_texts:
        out = [out[i] for i in sorted(rng.choice(len(out), cfg.max_texts, replace=False))]
    return out


def hold_out_pairs(pairs: list[tuple[str, str]], n: int, *, seed: int,
                   origins: list[int] | None = None) -> tuple[list, list]:
    """(kept, held) (query, item_id) pairs: ``n`` pairs held out of training, at most one per item and
    never an item's last query, chosen by a seeded permutation (kept pairs keep their order); with
    ``origins`` only base pairs are held out and their derived pairs dropped (ace/pipeline/query_pairs.py)."""
    try:
        return _hold_out_pairs(pairs, n, seed=seed, origins=origins, error=PipelineError)
    except QueryPairsError as exc:
        raise PipelineError(str(exc)) from None


# ----------------------------------------------------------------------------- stages


class Pipeline:
    def __init__(self, cfg: RunConfig, *, progress: bool = True, force: Sequence[str] = ()):
        """``force``: stages to re-run from scratch (their done-markers are dropped; a forced ``train``
        also discards its checkpoints instead of resuming from them)."""
        self.cfg = cfg
        self.run = RunFolder(cfg.run_dir)
        unknown = [s for s in force if s not in STAGES]
        if unknown:
            raise PipelineError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
        if cfg.hybrid.enabled and cfg.split.scorer_queries <= 0:  # fail before training, not after it
            raise PipelineError("hybrid.enabled=true needs split.scorer_queries > 0: the hybrid weight is fitted on "
                                "training queries held out of training")
        self.forced = set(force)
        self.launch = Launch()  # the ranks of accelerate launch / torchrun: all encode, rank 0 runs the rest
        for stage in self.forced if self.launch.rank == 0 else ():
            self.run.invalidate(stage)
        self.progress = progress
        self.device = resolve_device(cfg.device, error=PipelineError)
        self.keys: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def _stage(self, name: str, key: str, fn, force: bool = False) -> bool:
        """Run ``fn`` unless the stage is up to date; returns True when it ran."""
        self.keys[name] = key
        if not force and self.run.is_done(name, key):
            log.info("[%s] up to date, skipped", name)
            print(f"[{name}] up to date (key {key}), skipped")
            return False
        print(f"[{name}] running")
        t = time.time()
        info = fn() or {}
        self.timings[name] = time.time() - t
        self.run.mark_done(name, key, {"seconds": self.timings[name], **info})
        print(f"[{name}] done in {self.timings[name]:.1f}s")
        return True

    # corpus ----------------------------------------------------------------------------------
    def stage_corpus(self):
        cfg = self.cfg

        def run():
            corpus = load_source_corpus(cfg.corpus)  # the loaders validate (rows named in errors)
            train_corpus, test_pairs = split_captions(corpus, cfg.split)
            corpus.save_jsonl(self.run.corpus)
            train_corpus.save_jsonl(self.run.corpus_train)
            write_pairs(self.run.test_queries, test_pairs)
            write_json_atomic(self.run.corpus_root, {"root": str(corpus.root) if corpus.root else None})
            return {"items": len(corpus), "test_queries": len(test_pairs),
                    "modalities": {m: len(v) for m, v in corpus.by_modality().items()}}

        self._stage("corpus", self.corpus_key(), run)

    def corpus_key(self) -> str:
        return config_hash(self.cfg.corpus, self.cfg.split)

    def _corpus(self, name: str = RunPaths.CORPUS_TRAIN) -> Corpus:
        return load_run_corpus(self.run.path, name)

    # encode ----------------------------------------------------------------------------------
    def stage_encode(self):
        """Item embeddings; data-parallel over ``encode.processes`` workers or the ranks of a launch
        (ace/pipeline/encode_stage.py), the same bytes as one process."""
        cfg = self.cfg
        key = config_hash(self.keys["corpus"], cfg.encoder)
        enc_cfg = dataclasses.replace(cfg.encoder, cache_dir=cfg.encoder.cache_dir or str(self.run.cache / "embeddings"))
        try:
            stage = EncodeStage(self.run.path, enc_cfg, cfg.encode, key, launch=self.launch, progress=self.progress)
            if self.launch.rank > 0:
                self.keys["encode"] = key
                stage.follow(self._corpus)
                return

            def run():
                corpus = self._corpus()
                emb, info = stage.run(corpus)
                if not np.isfinite(emb).all():
                    bad = np.where(~np.isfinite(emb).all(1))[0][:10]
                    raise PipelineError(f"the encoder returned NaN/inf embeddings for items {[corpus.items[i].item_id for i in bad]}")
                write_npy_atomic(self.run.embeddings, emb)
                write_json_atomic(self.run.item_ids, corpus.item_ids)
                return {"shape": list(emb.shape), **info}

            if self._stage("encode", key, run):
                stage.folder.remove()
        except EncodeError as exc:
            raise PipelineError(str(exc)) from None

    # querygen --------------------------------------------------------------------------------
    def stage_querygen(self):
        cfg = self.cfg

        def run():
            from querygen import build_backend, run_querygen

            corpus = self._corpus()
            qcfg = dataclasses.replace(cfg.querygen, media_root=cfg.querygen.media_root or (str(corpus.root) if corpus.root else None))
            summary = run_querygen(corpus.items, build_backend(qcfg), config=qcfg, out_dir=self.run.queries)
            print(summary.format())
            if summary.items_pending:  # the stage is not done: the next run continues from the cache
                raise PipelineError(f"querygen: {summary.items_pending} of {summary.items} items are still pending "
                                    f"after the time budget (querygen.max_seconds={qcfg.max_seconds}); the queries "
                                    f"made so far are cached in {self.run.queries}: re-run the same command to "
                                    f"continue, or raise querygen.max_seconds")
            pairs, origins = base_first(_read_query_dataset(Path(summary.dataset_path)))
            write_pairs(self.run.train_queries, pairs)
            if origins is None:
                self.run.query_origins.unlink(missing_ok=True)
                return {"queries": len(pairs)}
            write_json_atomic(self.run.query_origins, origins)  # derived queries (lever 2): base pairs first
            return {"queries": len(pairs), "derived_queries": sum(o != k for k, o in enumerate(origins))}

        self._stage("querygen", config_hash(self.keys["corpus"], section_key(cfg.querygen, "querygen")), run)

    def training_pairs(self) -> tuple[list, list]:
        """(kept, held): the training pairs minus the ``split.scorer_queries`` held out (and their derived queries)."""
        return hold_out_pairs(read_pairs(self.run.train_queries), self.cfg.split.scorer_queries, seed=self.cfg.seed,
                              origins=read_query_origins(self.run.path))

    # identifiers -----------------------------------------------------------------------------
    def identifier_vectors(self, ids: list[str], emb: np.ndarray) -> np.ndarray:
        """What the identifiers quantise: the item embeddings, or (``identifiers.vectors:
        item_plus_queries``) the normalised mean of each item's embedding and its training queries'
        vectors from ``identifiers.query_encoder``, which must share the item embedding's space."""
        icfg = self.cfg.identifiers
        if icfg.vectors == "item":
            return emb
        from ace.data.encoders import TextEncoder
        from ace.newitems.query_tower import item_plus_query_vectors

        # the training pairs only: queries held out for the hybrid weight (split.scorer_queries) stay unseen
        pairs, _ = self.training_pairs()
        enc = TextEncoder(icfg.query_encoder, device=self.device)
        if enc.dim != emb.shape[1]:
            raise PipelineError(f"identifiers.vectors=item_plus_queries: the query encoder {icfg.query_encoder!r} "
                                f"gives {enc.dim}-d vectors but the item embeddings are {emb.shape[1]}-d; it must "
                                f"share the item embedding's space (or set identifiers.vectors=item)")
        known = set(ids)
        pairs = [(q, iid) for q, iid in pairs if iid in known]
        qv = enc.encode([q for q, _ in pairs], progress=self.progress)
        try:
            return item_plus_query_vectors(emb, ids, qv, [iid for _, iid in pairs])
        except ValueError as exc:
            raise PipelineError(f"identifiers.vectors=item_plus_queries: {exc}") from None

    def stage_identifiers(self):
        cfg = self.cfg

        def run():
            ids, emb = load_run_embeddings(self.run.path)
            vectors = self.identifier_vectors(ids, emb)
            tok = SemanticIdTokenizer.fit(vectors, ids, cfg.identifiers, device=self.device, progress=self.progress)
            out = self.run.identifiers
            if out.exists():
                shutil.rmtree(out)
            tok.save(out)
            if vectors is not emb:  # the prototype heads (model.prototype_levels) read what was quantised
                np.save(self.run.identifier_vectors, vectors)
            else:
                self.run.identifier_vectors.unlink(missing_ok=True)
            summary = tok.summary()
            print("[identifiers]", json.dumps({k: summary[k] for k in summary if k != "times"}, default=str)[:600])
            return {"summary": summary, "vectors": cfg.identifiers.vectors}

        key = config_hash(self.keys["encode"], section_key(cfg.identifiers, "identifiers"),
                          *([self.keys["querygen"], cfg.split.scorer_queries, cfg.seed]
                            if cfg.identifiers.vectors != "item" else []))
        self._stage("identifiers", key, run)

    # train -----------------------------------------------------------------------------------
    def model_config(self, level_sizes: list[int], prototype_dim: int = 0):
        return ace_model_config(self.cfg.model, level_sizes, prototype_dim)

    def prototype_vectors(self, tok) -> np.ndarray:
        """The vectors the identifiers quantised, rows in ``tok.item_ids`` order (prototype heads)."""
        ids, emb = load_run_embeddings(self.run.path)
        vec_file = self.run.identifier_vectors
        vectors = np.load(vec_file) if vec_file.is_file() else emb
        if len(vectors) != len(ids):
            raise PipelineError(f"{vec_file}: {len(vectors)} rows for {len(ids)} items; re-run the identifiers stage")
        row = {iid: i for i, iid in enumerate(ids)}
        missing = [iid for iid in tok.item_ids if iid not in row]
        if missing:
            raise PipelineError(f"identifiers name items without embeddings, e.g. {missing[:3]}; re-run the identifiers stage")
        return vectors[[row[iid] for iid in tok.item_ids]]

    def stage_train(self):
        cfg = self.cfg
        key = config_hash(self.keys["identifiers"], self.keys["querygen"], cfg.split, section_key(cfg.model, "model"),
                          cfg.training, cfg.seed, *([cfg.pretrain] if cfg.pretrain.files else []))

        def run():
            import torch

            from ace.model.modeling import AceModel
            from ace.model.tokens import IdentifierVocab, QueryTokenizer
            from ace.training.loop import latest_checkpoint, train_retriever

            torch.manual_seed(cfg.seed)
            tok = SemanticIdTokenizer.load(self.run.identifiers, device=self.device)
            pairs, held = self.training_pairs()
            write_pairs(self.run.scorer_queries, held)
            vectors = self.prototype_vectors(tok) if cfg.model.prototype_levels else None
            ace_cfg, enc_path = self.model_config(tok.level_sizes, 0 if vectors is None else vectors.shape[1])
            if enc_path:
                qtok = QueryTokenizer.from_pretrained(enc_path, max_length=ace_cfg.max_query_length)
            else:
                qtok = QueryTokenizer.train([q for q, _ in pairs], vocab_size=cfg.model.query_vocab_size,
                                            model_type=cfg.model.query_tokenizer_type,
                                            max_length=ace_cfg.max_query_length)
                ace_cfg.query_vocab_size = qtok.vocab_size
            vocab = IdentifierVocab(tok.level_sizes)
            ckpt_key = self.run.checkpoints / "KEY"
            if "train" in self.forced and self.run.checkpoints.exists():
                print("[train] forced: discarding the checkpoints, training from scratch")
                shutil.rmtree(self.run.checkpoints)
            elif ckpt_key.is_file() and ckpt_key.read_text() != key:
                print("[train] config changed since the last checkpoints: starting afresh")
                shutil.rmtree(self.run.checkpoints)
            self.run.checkpoints.mkdir(exist_ok=True)
            ckpt_key.write_text(key)
            model = AceModel(ace_cfg)
            if cfg.model.init_identifier_embeddings:
                model.init_identifier_embeddings(tok.level_vectors, seed=cfg.seed)
            if vectors is not None:
                model.init_prototype_heads(tok.codes, vectors)
            latest = latest_checkpoint(self.run.path)
            if latest is not None:
                print(f"[train] resuming from checkpoint {latest.name}")
            elif cfg.pretrain.files:  # a checkpoint already holds the pretrained weights
                self.pretrain(model, qtok, tok, vocab)
            rng = np.random.default_rng(cfg.seed)
            val = [pairs[i] for i in rng.permutation(len(pairs))[: cfg.split.val_queries]] if cfg.split.val_queries else None
            teacher = None
            if cfg.training.distill_weight > 0:
                from ace.training.distill import teacher_for_pairs
                teacher = teacher_for_pairs(pairs, tok, vocab, encoder=cfg.training.distill_encoder,
                                            tau=cfg.training.distill_tau, device=self.device,
                                            cache_file=self.run.cache / f"teacher_{key[:12]}.npy")
            result = train_retriever(model, qtok, tok, vocab, pairs, val, cfg.training, self.run.path, resume=True,
                                     teacher=teacher)
            qtok.save(self.run.query_tokenizer)
            vocab.save(self.run.identifier_vocab)
            return {"steps": result.step, "best_step": result.best_step, "seconds_train": result.seconds,
                    "train_pairs": len(pairs), "scorer_queries": len(held)}

        self._stage("train", key, run)

    def pretrain(self, model, qtok, tok, vocab) -> None:
        """Identifier-space pretraining (``pretrain:``, lever 4) of a fresh model, before the item pairs."""
        from ace.data.encoders import TextEncoder
        from ace.training.loop import pretrain_identifier_prefixes

        cfg = self.cfg
        own = [c for it in self._corpus(RunPaths.CORPUS).items for c in it.captions]
        texts = pretraining_texts(cfg.pretrain, None if cfg.corpus.demo else cfg.corpus.path, own, seed=cfg.seed)
        enc = TextEncoder(cfg.pretrain.encoder, device=self.device)
        if enc.dim != tok.centroids.shape[1]:
            raise PipelineError(f"pretrain.encoder {cfg.pretrain.encoder!r} gives {enc.dim}-d vectors but the "
                                f"identifiers were built from {tok.centroids.shape[1]}-d ones; it must share their space")
        prefixes = tok.encode_prefixes(enc.encode(texts, progress=self.progress))
        t = time.time()
        losses = pretrain_identifier_prefixes(model, qtok, vocab, texts, prefixes, cfg.training,
                                              epochs=cfg.pretrain.epochs, device=self.device, progress=self.progress)
        write_json_atomic(self.run.pretrain, {"texts": len(texts), "files": cfg.pretrain.files,
                                                        "steps": len(losses), "seconds": time.time() - t,
                                                        "first_loss": losses[0] if losses else None,
                                                        "last_loss": losses[-1] if losses else None})
        print(f"[train] pretrained on {len(texts)} identifier-prefix pairs of other caption files, "
              f"{len(losses)} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}")

    # fallback --------------------------------------------------------------------------------
    def stage_fallback(self):
        """Query tower + hash head + calibration for items added after training (RUN/fallback)."""
        cfg = self.cfg
        if not cfg.fallback.enabled:
            print("[fallback] disabled (fallback.enabled=false): the run serves the generative path only")
            return

        def run():
            from ace.pipeline.fallback_stage import build_run_fallback

            summary = build_run_fallback(self.run.path, cfg.fallback, seed=cfg.seed, device=self.device,
                                         progress=self.progress)
            rec = summary["held_out_recall"]
            print(f"[fallback] {summary['tower']} query tower, {summary['bits']}-bit codes; held-out training queries: "
                  f"fallback R@10 {rec['fallback_over_trained_items']['R@10']:.1f} over all trained items, "
                  f"generative R@10 {rec['generative']['R@10']:.1f}")
            return {"summary": summary}

        self._stage("fallback", config_hash(self.keys["train"], cfg.encoder, cfg.fallback, cfg.seed), run)

    # hybrid ----------------------------------------------------------------------------------
    def stage_hybrid(self):
        """Item vectors in the query encoder's text space + the fused scorer's weight (RUN/hybrid)."""
        cfg = self.cfg
        if not cfg.hybrid.enabled:
            print("[hybrid] disabled (hybrid.enabled=false): no hybrid search mode for this run")
            return

        def run():
            from ace.pipeline.hybrid_stage import build_run_hybrid

            info = build_run_hybrid(self.run.path, cfg.hybrid, device=self.device, seed=cfg.seed)
            fit = info["fit"]
            alone = fit.get("val_generative_only")  # None when hybrid.weights has no 0 (a fixed w, say)
            print(f"[hybrid] w={info['weight']:g} ({info['item_vectors']}, {info['storage']}, "
                  f"{info['bytes_per_item']:.0f} B/item) on {fit['queries']} held-out training queries: R@1 "
                  f"{fit['val_at_weight']['R@1']:.1f}" + (f" (generative alone {alone['R@1']:.1f})" if alone else "")
                  + f", gold in the top-{info['candidates']} for {fit['candidate_recall']:.1f}%")
            return {"summary": info}

        self._stage("hybrid", config_hash(self.keys["train"], cfg.hybrid, cfg.seed), run)

    # eval ------------------------------------------------------------------------------------
    def stage_eval(self):
        cfg = self.cfg

        def run():
            metrics = evaluate_run(self.run.path, cfg.eval, device=self.device, progress=self.progress)
            write_json_atomic(self.run.metrics, metrics)
            head = metrics["by_group"]["all"]
            print(f"[eval] R@1 {head['R@1']:.1f}  R@5 {head['R@5']:.1f}  R@10 {head['R@10']:.1f}  "
                  f"MRR@10 {head['MRR@10']:.1f}  ({head['queries']} held-out queries)")
            for name, res in metrics.get("query_sets", {}).items():
                a = res["by_group"]["all"]
                print(f"[eval] {name}: top-1 relevant {a['top1']:.1f}%  top-5 {a['top5']:.1f}%  ({a['queries']} queries)")
            return {"headline": head}

        from ace.pipeline.query_sets import QuerySetError, query_set_digest

        try:
            sets_key = query_set_digest(cfg.eval.query_sets)
        except QuerySetError as exc:
            raise PipelineError(f"eval.query_sets: {exc}") from None
        eval_key = {k: v for k, v in to_dict(cfg.eval).items() if k != "reference"}  # it only changes report.md
        # search goes through the fallback and hybrid stages' outputs too (Retriever.search, mode auto)
        later = [self.keys.get(name) for name in ("fallback", "hybrid")]
        self._stage("eval", config_hash(self.keys["train"], eval_key, sets_key, later), run)

    # report ----------------------------------------------------------------------------------
    def stage_report(self):
        from ace.pipeline.report import (plot_identifier_distribution, plot_recall, plot_training_curves, read_jsonl,
                                         reference_table, write_report)

        plots_dir = self.run.plots
        plots_dir.mkdir(exist_ok=True)
        metrics = json.loads(self.run.metrics.read_text())
        tok_summary = (self.run.stage_record("identifiers") or {}).get("summary", {})
        codes = np.load(self.run.identifiers / "codes.npy") if (self.run.identifiers / "codes.npy").is_file() \
            else SemanticIdTokenizer.load(self.run.identifiers, device="cpu").codes
        M = codes.shape[1] - 2
        plots = [
            plot_training_curves(read_jsonl(self.run.train_log), plots_dir / "training_curves.png"),
            plot_recall(metrics["by_group"], plots_dir / "recall.png"),
            plot_identifier_distribution(codes, ["k"] + [f"v{i + 1}" for i in range(M)] + ["u"], plots_dir / "identifiers.png"),
        ]
        seconds = {s: (self.run.stage_record(s) or {}).get("seconds") for s in STAGES[:-1]}
        usage = ", ".join(f"{u['level']} {u['used']}/{u['size']}" for u in tok_summary.get("codebook_usage", []))
        sections = {
            "Run": f"config: `config.yaml` · items: {codes.shape[0]} · stage seconds (last run of each): "
                   + ", ".join(f"{s} {v:.0f}" for s, v in seconds.items() if v is not None),
            "Identifiers": f"items {tok_summary.get('N')} · collision rate (u > 0) {100 * tok_summary.get('collision_rate', 0):.1f}% · "
                           f"max u {tok_summary.get('max_u')} · distinct prefixes {tok_summary.get('distinct_prefixes')} · "
                           f"codes used per level: {usage}",
        }
        if self.cfg.eval.reference:
            sections["Before and after"] = ("Earlier figures (`eval.reference` of the config) beside this run's; "
                                            "top-1 / top-5 in %.\n\n" + reference_table(self.cfg.eval.reference, metrics))
        if metrics.get("beams"):
            sections["Beam sizes"] = "\n".join(f"- beams {b}: R@1 {m['R@1']:.1f}, R@10 {m['R@10']:.1f}" for b, m in metrics["beams"].items())
        write_report(self.run.path, title=f"ACE run: {self.cfg.name}", metrics=metrics, sections=sections, plots=plots)
        print(f"[report] {self.run.report}")

    def save_config(self):
        save_config(self.cfg, self.run.config)

    def run_all(self, until: str = "report"):
        steps = [self.stage_corpus, self.stage_encode, self.stage_querygen, self.stage_identifiers,
                 self.stage_train, self.stage_fallback, self.stage_hybrid, self.stage_eval, self.stage_report]
        first = 0
        if self.launch.world > 1:  # corpus (rank 0) and encode (every rank) under the launch, then rank 0 alone
            try:
                if not run_launched(self, until) or until in STAGES[:2]:
                    return
            except LaunchError as exc:
                raise PipelineError(str(exc)) from None
            first = 2
        else:
            self.save_config()
        for name, step in list(zip(STAGES, steps))[first:]:
            step()
            if name == until:
                break


def _read_query_dataset(path: Path) -> list[tuple[str, str, str]]:
    """(query, item_id, source) rows from the querygen dataset (Arrow folder or JSONL)."""
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        return list(zip(ds["query"], ds["item_id"], ds["source"]))
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [(r["query"], r["item_id"], r.get("source", "")) for r in rows]


def evaluate_run(run_dir: str | Path, eval_cfg: EvalConfig, *, device: str = "cpu", progress: bool = False) -> dict:
    """Held-out query metrics of a trained run, overall and per modality, for each beam size."""
    from ace.serving.retriever import Retriever

    run_dir = Path(run_dir)
    retriever = Retriever.from_run(run_dir, device=device)
    test = read_pairs(RunPaths(run_dir).test_queries)
    if not test:
        raise PipelineError(f"{run_dir} has no held-out test queries (split.test_captions)")
    queries, targets = [q for q, _ in test], [t for _, t in test]
    modality = {it.item_id: it.modality for it in retriever.corpus.items}
    out: dict = {"beams": {}}
    for b in eval_cfg.num_beams:
        hits = retriever.search(queries, k=min(eval_cfg.top_k, b), num_beams=b, batch_size=eval_cfg.batch_size,
                                progress=progress)
        rankings = [[h.item_id for h in row] for row in hits]
        groups = {"all": retrieval_metrics(rankings, targets)}
        for m in sorted(set(modality.values())):
            idx = [i for i, t in enumerate(targets) if modality.get(t) == m]
            if idx and len(set(modality.values())) > 1:
                groups[m] = retrieval_metrics([rankings[i] for i in idx], [targets[i] for i in idx])
        out["beams"][str(b)] = groups["all"]
        if "by_group" not in out:
            out["by_group"] = groups
            out["headline_beams"] = b
    if eval_cfg.query_sets:
        from ace.pipeline.query_sets import QuerySetError, evaluate_query_set

        out["query_sets"] = {}
        for path in eval_cfg.query_sets:
            try:
                out["query_sets"][Path(path).stem] = evaluate_query_set(
                    retriever, path, num_beams=out["headline_beams"], k=min(eval_cfg.top_k, out["headline_beams"]), batch_size=eval_cfg.batch_size)
            except QuerySetError as exc:
                raise PipelineError(f"eval.query_sets: {exc}") from None
    return out
