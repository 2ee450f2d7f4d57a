"""The run config (``train.py --config``): one section per stage, each owned by its stage's module.

``RunConfig`` gathers them: ``corpus`` / ``split`` / ``pretrain`` / ``eval`` (defined here), ``encoder``
(ace/data/encoders.py), ``encode`` (ace/pipeline/encode_stage.py: processes and shards), ``identifiers`` (identifiers/), ``querygen`` (querygen/), ``model``
(ace/model/config.py, derived from AceConfig), ``training`` (ace/training/loop.py) and ``fallback``
(ace/newitems/index.py). Read one with ``ace.config.load_config(RunConfig, path, overrides)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ace.data.encoders import MultiModalEncoderConfig
from ace.pipeline.encode_stage import EncodeConfig
from ace.model.config import ModelSection
from ace.newitems.hybrid import HybridConfig
from ace.newitems.index import FallbackConfig
from ace.training.loop import TrainConfig
from identifiers import IdentifierConfig
from querygen import QueryGenConfig


@dataclass
class CorpusConfig:
    path: str = ""                  # corpus table (JSONL/CSV/Parquet) or a public caption file
    format: str = "auto"            # auto | table | karpathy | flickr8k | clotho | audiocaps | msvd | didemo
    root: str | None = None         # media root for relative media paths (table corpora)
    demo: bool = False              # make the embedded demonstration corpus (data/make_demo.py) and use it
    demo_dir: str = "data/demo"
    demo_seed: int = 0
    limit: int | None = None        # first N items only (quick trials)
    min_captions: int = 0           # drop items with fewer captions (caption proxy: 5)


@dataclass
class SplitConfig:
    """Which captions of an item are held out as test queries (never seen by querygen or training)."""
    test_captions: list[int] = field(default_factory=lambda: [-2, -1])
    val_queries: int = 0            # training queries also used for periodic eval (0 = eval at the end only)
    scorer_queries: int = 0         # training queries held OUT of training (RUN/scorer_queries.json): the hybrid
                                    # scorer's weight is fitted on them (ace/newitems/hybrid.py); never test captions


@dataclass
class PretrainConfig:
    """Identifier-space pretraining (issue 19, lever 4), off while ``files`` is empty: before the
    item pairs, the decoder learns (text, identifier prefix (k, v1..vM) of that text's own embedding
    under the fitted identifiers) from the caption texts of *other* caption files. The run's own
    caption file is refused and every caption of the run's corpus (training and test) is dropped."""
    files: list[str] = field(default_factory=list)  # caption files (any ace.data.importers format)
    max_texts: int = 20000          # random sample of their distinct captions
    epochs: int = 1
    encoder: str = "minilm"         # gives each text's embedding; must share the identifiers' space


@dataclass
class EvalConfig:
    num_beams: list[int] = field(default_factory=lambda: [10])   # first = headline; others reported too
    top_k: int = 10
    batch_size: int = 100
    # JSON-lines query sets judged by item metadata (ace/pipeline/query_sets.py), e.g. data/demo_queries.jsonl:
    # top-1 / top-5 relevant in metrics.json and report.md beside the held-out-caption figures
    query_sets: list[str] = field(default_factory=list)
    # earlier figures shown beside this run's in report.md ("Before and after"), e.g. the demo before a
    # change: {label: {figure: value}}, figures named as in the report ("held-out R@1", "<set> top-1",
    # "<set> top-5" with <set> the query set file's stem); not part of the eval stage's key
    reference: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    encoder: MultiModalEncoderConfig = field(default_factory=MultiModalEncoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)         # how the encode stage runs: processes, shards
    identifiers: IdentifierConfig = field(default_factory=IdentifierConfig)
    querygen: QueryGenConfig = field(default_factory=QueryGenConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)   # items added after training (RUN/fallback)
    hybrid: HybridConfig = field(default_factory=HybridConfig)         # hybrid scorer (RUN/hybrid, ace/newitems/hybrid.py)
