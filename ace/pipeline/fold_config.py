"""``FoldConfig``: the settings of ``train.py fold`` (ace/pipeline/fold.py), ``key=value`` on its command line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class FoldConfig:
    """Fine-tuning and evaluation settings of a fold (``key=value`` on the command line)."""
    steps: int = 500                  # fine-tuning steps
    replay_ratio: float = 1.0         # old training pairs replayed per new pair
    min_replay: int = 1000            # at least this many old pairs (all of them when fewer exist)
    replay: str = "structured"        # "structured": every prefix the new items touch + a sample stratified
                                      # by the first level (fold_gate.structured_replay); "random"
    replay_per_prefix: int = 2        # old pairs replayed per touched prefix (structured)
    distill_weight: float = 1.0       # KL(previous model || folded model) on replayed old pairs; 0: replay only
    gate: bool = True                 # false: fold every item (the gate still measures)
    max_old_drop: float = 1.0         # swap only when old-item R@gate_k on validation queries drops by less
    max_new_drop: float = 0.0         # ... and when all candidates' R@gate_k on their validation queries, generative
                                      # path after vs as served before, drops by at most this
    gate_z: float = 1.645             # each drop is compared at drop + gate_z x its paired standard error over the
                                      # validation queries (1.645: one-sided 95 %); 0: the point estimate only
    gate_k: int | None = None         # the gate's recall cut-off, 1, 5 or 10 (None: top_k)
    gate_path: str = "served"         # "served": on a hybrid run, recall of the hybrid-scored generative path,
                                      # new items' bar = merged search while in the fallback (else as "generative");
                                      # "generative": beam search alone, bar = the fallback alone
    old_bar: str = "auto"             # the old items' "before" on a hybrid run (gate_path served): "served", merged
                                      # search with the candidates in the fallback, as users have it before the
                                      # fold; "unshared", the hybrid-scored generative path over the old items
                                      # alone (the adds' own cost is charged to the fold); "auto": served on a
                                      # hybrid run with gate_path served, else unshared (resolved by Fold and
                                      # recorded in plan.json)
    calibrate: bool = True            # on a hybrid run (gate_path served): fit a log-prob offset for the folded
                                      # items on the validation queries (cross-fitted, fold_gate.cross_fit_offset),
                                      # served from RUN/model/folded_offsets.json; false: offset 0
    offset_grid: list[float] = field(default_factory=lambda: [16.0, 12.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5,
                                                              0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, -8.0,
                                                              -12.0, -16.0])
                                      # up to +16: folded items come out of a short fine-tuning under-scored (on
                                      # mscoco 80/20 held-out test they match their fallback recall near +6)
    val_per_item: int = 1             # new items' generated queries held out of fine-tuning for the gate (never
                                      # an item's last one, nor its document: fold_gate.make_split)
    val_old: int = 500                # old items' validation queries of the gate (0: none; the run's
                                      # scorer queries when it has them, else old training pairs left out of replay)
    batch_size: int | None = None     # None: the run's training.batch_size
    lr: float | None = None           # None: half the run's training.lr
    warmup_steps: int = 50
    omega: float | None = None        # R-Drop weight; None: the run's training.omega
    checkpoint_every: int = 100
    eval_queries: int = 2000          # held-out old-item queries scored before/after (0: none)
    test_queries: str | None = None   # JSON [[query, item_id], ...] held out for the added items;
                                      # None: RUN/added_test_queries.json when it exists
    num_beams: int = 10
    top_k: int = 10
    eval_batch_size: int = 100
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "num_beams", "top_k", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("replay_ratio", "min_replay", "warmup_steps", "eval_queries", "replay_per_prefix",
                     "distill_weight", "max_old_drop", "max_new_drop", "val_per_item", "val_old", "gate_z"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.offset_grid or any(not math.isfinite(x) for x in self.offset_grid):
            raise ValueError(f"offset_grid must be a non-empty list of finite numbers, got {self.offset_grid}")
        if self.gate_path not in ("served", "generative"):
            raise ValueError(f"gate_path must be 'served' or 'generative', got {self.gate_path!r}")
        if self.old_bar not in ("auto", "unshared", "served"):
            raise ValueError(f"old_bar must be 'auto', 'unshared' or 'served', got {self.old_bar!r}")
        if self.old_bar == "served" and self.gate_path != "served":
            raise ValueError("old_bar=served measures old items through merged search as served: it needs gate_path=served")
        if self.replay not in ("structured", "random"):
            raise ValueError(f"replay must be 'structured' or 'random', got {self.replay!r}")
        if self.gate and self.val_per_item < 1:
            raise ValueError("gate=true needs val_per_item >= 1 (validation queries per new item); "
                             "set gate=false to fold every item without them")
        k = self.gate_k if self.gate_k is not None else self.top_k
        if k not in (1, 5, 10) or k > self.top_k:
            raise ValueError(f"the gate's cut-off (gate_k, else top_k) must be 1, 5 or 10 and <= top_k ({self.top_k}), got {k}")
        if self.top_k > self.num_beams:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_beams ({self.num_beams})")
