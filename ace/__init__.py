"""ACE: generative cross-modal retrieval (a text query -> the decoded identifier of the matching item).

The folder tree follows the data flow (docs/ARCHITECTURE.md)::

    ace/data/      corpus tables, caption-file importers, item encoders       -> item embeddings
    identifiers/   (top-level package) semantic identifiers + prefix trie     -> RUN/identifiers
    ace/model/     identifier tokens, fusion, AceModel, constrained decoding
    ace/training/  training loop, losses, prefix-prototype teacher            -> RUN/model
    ace/newitems/  query tower, hash head, binary index, calibration + merge  -> RUN/fallback
    ace/pipeline/  the stages train.py runs, the report, fold                 -> the run folder
    ace/serving/   retriever over a run folder, item store, items CLI, HTTP server
    ace/bench/     quality / efficiency benchmarks (python -m ace.bench ...)
    ace/config.py, ace/metrics.py, ace/run_folder.py: shared by every stage

The public API below is re-exported lazily (importing ``ace`` loads no torch), e.g.
``from ace import Retriever, load_corpus``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # data
    "Corpus": "ace.data.corpus", "CorpusItem": "ace.data.corpus", "CorpusError": "ace.data.corpus",
    "load_corpus": "ace.data.corpus", "corpus_from_captions": "ace.data.corpus",
    # configuration + metrics
    "load_config": "ace.config", "save_config": "ace.config", "ConfigError": "ace.config",
    "ServeConfig": "ace.config", "retrieval_metrics": "ace.metrics",
    # model
    "AceConfig": "ace.model.modeling", "AceModel": "ace.model.modeling",
    "IdentifierVocab": "ace.model.tokens", "QueryTokenizer": "ace.model.tokens",
    "constrained_beam_search": "ace.model.decoding",
    # training
    "TrainConfig": "ace.training.loop", "train_retriever": "ace.training.loop",
    "evaluate_retriever": "ace.training.evaluate",
    # pipeline
    "RunConfig": "ace.pipeline.run_config", "Pipeline": "ace.pipeline.stages", "evaluate_run": "ace.pipeline.stages",
    "FoldConfig": "ace.pipeline.fold", "fold_run": "ace.pipeline.fold",
    # serving
    "Retriever": "ace.serving.retriever", "SearchHit": "ace.serving.retriever",
    "RetrieverError": "ace.serving.errors", "ItemConflictError": "ace.serving.errors",
    "ItemNotFoundError": "ace.serving.errors", "WriterLockError": "ace.serving.errors",
    "ItemStore": "ace.serving.store", "create_app": "ace.serving.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
