"""Training loop for the ACE retriever on `accelerate`: one code path for CPU, one GPU, many GPUs.

    result = train_retriever(model, query_tokenizer, id_tokenizer, vocab, train_pairs, val_pairs, cfg, run_dir)

A *pair* is ``(query text, item)`` where item is a row index into ``id_tokenizer.codes`` or an
item id string from ``id_tokenizer.item_ids``. Queries go through the query tokenizer, the item's
identifier ``(k, v1..vM, u)`` through ``IdentifierVocab.encode`` into labels ``[t_1 .. t_L]``;
the decoder input is the labels shifted right with BOS.

``cfg.batch_size`` is the *global* batch: with N processes each takes a 1/N slice of it, so the
optimisation trajectory (steps, schedule, effective batch) is the same for 1 or N processes.
Each epoch is a fixed permutation seeded by ``(seed, epoch)``, so the data position is a
function of the step alone and resume continues exactly where the killed run was.

Run folder layout written here::

    run_dir/checkpoints/step-N/   accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    run_dir/model/                save_pretrained of the best (or last) weights
    run_dir/train_log.jsonl       one JSON line per log / eval event
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ace.config import to_dict
from ace.training.losses import ace_loss
from ace.run_folder import RunPaths
from ace.training.evaluate import metrics_from_rows, query_length, rank_items
from ace.training.pairs import EncodedPairs, TrainingDataError, encode_pairs, identifier_targets, tokenize_queries


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run (model sizes and dropout live in AceConfig)."""

    lr: float = 1e-4  # peak learning rate, reached after warmup
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine decays from lr to lr * min_lr_ratio
    weight_decay: float = 0.01  # not applied to biases / norms
    optimizer: str = "adamw"  # "adam" | "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 256  # global batch (split across processes)
    max_steps: int | None = None  # overrides epochs when set
    epochs: int = 20
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    omega: float = 0.15  # R-Drop weight; 0 turns R-Drop off
    freeze_encoder: bool = False  # train the decoder only (a pretrained encoder stays as it is; cheaper steps)
    query_token_dropout: float = 0.0  # hide this share of query tokens (not the first) from the decoder per step
    encoder_cache_gb: float = 4.0  # frozen encoder: keep its outputs for every training query in RAM up to this size
    distill_weight: float = 0.0  # prefix-prototype teacher term (ace/training/distill.py); 0 = the paper's loss
    distill_tau: float = 20.0  # teacher softmax scale on cosine similarities
    distill_encoder: str = "all-MiniLM-L6-v2"  # text encoder of the teacher (a local path works too)
    max_query_length: int | None = None  # None: the model's config.max_query_length
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # most recent step-N folders kept (the best one is kept too)
    eval_every: int = 1000  # 0: only at the end
    eval_batch_size: int = 100
    max_eval_queries: int | None = None  # evaluate on a fixed subset during training
    num_beams: int = 10  # beams of constrained search during eval (>= eval_top_k)
    eval_top_k: int = 10
    best_metric: str = "R@1"  # "R@1" | "R@5" | "R@10" | "MRR@10"
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"; used only on GPU
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.best_metric not in ("R@1", "R@5", "R@10", "MRR@10"):
            raise ValueError(f"best_metric must be one of R@1, R@5, R@10, MRR@10, got {self.best_metric!r}")
        for name in ("batch_size", "epochs", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
                     "num_beams", "eval_top_k", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_tau <= 0:
            raise ValueError(f"distill_tau must be > 0, got {self.distill_tau}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "omega", "distill_weight",
                     "encoder_cache_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_query_length is not None and self.max_query_length < 1:
            raise ValueError(f"max_query_length must be >= 1 or None, got {self.max_query_length}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not 0.0 <= self.query_token_dropout < 1.0:
            raise ValueError(f"query_token_dropout must be in [0, 1), got {self.query_token_dropout}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_top_k > self.num_beams:
            raise ValueError(f"eval_top_k ({self.eval_top_k}) cannot exceed num_beams ({self.num_beams})")


# these fields define the optimisation trajectory; resuming with other values is an error
_TRAJECTORY_FIELDS = ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "optimizer", "beta1", "beta2",
                      "batch_size", "max_steps", "epochs", "grad_clip", "omega", "max_query_length", "seed",
                      "distill_weight", "distill_tau", "distill_encoder", "freeze_encoder", "query_token_dropout")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear 0 -> 1 over warmup_steps, then cosine 1 -> min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- data


def query_token_dropout(attention_mask: torch.Tensor, p: float) -> torch.Tensor:
    """(B, N) mask -> the same with each real token but the first hidden with probability p (augmentation):
    the decoder's cross-attention does not see them (nor does the encoder, when it runs per step)."""
    drop = torch.rand(attention_mask.shape, device=attention_mask.device) < p
    drop[:, 0] = False
    return attention_mask * (~drop).to(attention_mask.dtype)


@torch.no_grad()
def cache_encoder_states(encoder: torch.nn.Module, pairs: EncodedPairs, *, budget_gb: float,
                         batch_size: int = 256, progress: bool = False) -> torch.Tensor | None:
    """Outputs of a frozen encoder for every query, (N, S_enc, W, d) float32 on the CPU (W = longest
    query), so that training runs it once instead of every epoch; None when that exceeds ``budget_gb``."""
    device = next(encoder.parameters()).device
    N, width = len(pairs), max(1, int(pairs.attention_mask.sum(1).max()))
    shape = (N, encoder.config.encoder_layers, width, encoder.config.d_model)   # AceEncoder's layer_states
    if math.prod(shape) * 4 > budget_gb * 2 ** 30:
        return None
    states = torch.zeros(shape, dtype=torch.float32)
    for start in tqdm(range(0, N, batch_size), desc="encode queries (frozen encoder)", disable=not progress,
                      leave=False):
        sub = pairs.batch(torch.arange(start, min(N, start + batch_size)))
        w = sub["input_ids"].shape[1]
        states[start:start + batch_size, :, :w] = encoder(
            input_ids=sub["input_ids"].to(device), attention_mask=sub["attention_mask"].to(device)).layer_states.float().cpu()
    return states


# ----------------------------------------------------------------------------- checkpoints


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (trainer_state.json written last), oldest first."""
    out = []
    if ckpt_root.is_dir():
        for d in ckpt_root.glob("step-*"):
            try:
                step = int(d.name.split("-", 1)[1])
            except ValueError:
                continue
            if (d / "trainer_state.json").is_file():
                out.append((step, d))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recent complete run_dir/checkpoints/step-N folder, or None."""
    dirs = _step_dirs(RunPaths(run_dir).checkpoints)
    return dirs[-1][1] if dirs else None


@dataclass
class TrainResult:
    """What a run produced: final step, where the model went, best eval, and the metric history."""

    step: int
    model_dir: Path
    best_step: int | None
    best_metrics: dict[str, float] | None
    final_metrics: dict[str, float] | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _JsonlLog:
    """Append-only train_log.jsonl written by the main process."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the killed run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("step", 0) <= step:
                    kept.append(rec)
        self.records = kept
        if self.enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class _StepState:
    """Step counter and best-so-far, checkpointed with accelerate's custom-state hook."""

    def __init__(self):
        self.step = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "best_value": self.best_value, "best_step": self.best_step,
                "best_metrics": self.best_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_value, self.best_step, self.best_metrics = state["best_value"], state["best_step"], state["best_metrics"]


# ----------------------------------------------------------------------------- loop


def make_accelerator(cfg: TrainConfig):
    """Accelerator with mixed precision only when a GPU is present."""
    from accelerate import Accelerator

    mixed = cfg.mixed_precision if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mixed)


def train_retriever(model: torch.nn.Module, query_tokenizer, id_tokenizer, vocab,
                    train_pairs: Sequence[tuple[str, Any]], val_pairs: Sequence[tuple[str, Any]] | None,
                    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = True, accelerator=None,
                    stop_at: int | None = None, teacher=None, anchor=None) -> TrainResult:
    """Train ``model`` on (query, item) pairs; checkpoints, resume, periodic eval, best-model export.

    ``teacher`` = (PrefixTeacher, (P, D) teacher vectors of ``train_pairs``) is required when
    ``cfg.distill_weight > 0`` (ace/training/distill.py; ``teacher_for_pairs`` builds both).
    ``anchor`` = (PreviousModel, (P,) bool: the anchored pairs, weight) adds weight x KL(previous ||
    current) of the next-token distributions on those pairs (``train.py fold``: the replayed old ones).

    ``stop_at`` ends the run after that step (checkpointing it) as if the job had been killed
    there; a later call with ``resume=True`` continues from it.
    """
    from accelerate.utils import gather_object, set_seed

    t0 = time.time()
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    ckpt_root = paths.checkpoints
    accelerator = accelerator or make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")

    max_len = query_length(model, query_tokenizer, cfg.max_query_length)
    train = encode_pairs(train_pairs, query_tokenizer, id_tokenizer, vocab, max_query_length=max_len,
                         what="train_pairs")
    val = None
    if val_pairs is not None and len(val_pairs) > 0:
        val = encode_pairs(val_pairs, query_tokenizer, id_tokenizer, vocab, max_query_length=max_len,
                           what="val_pairs")
        if cfg.max_eval_queries is not None and len(val) > cfg.max_eval_queries:
            keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_eval_queries]
            val = EncodedPairs(val.input_ids[keep], val.attention_mask[keep], val.decoder_input_ids[keep],
                               val.labels[keep], val.rows[keep])

    if cfg.distill_weight > 0:
        if teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher: pass teacher=teacher_for_pairs(...)")
        teacher_model, teacher_vectors = teacher[0], torch.as_tensor(np.asarray(teacher[1]), dtype=torch.float32)
        if teacher_vectors.shape[0] != len(train):
            raise ValueError(f"teacher has {teacher_vectors.shape[0]} query vectors for {len(train)} training pairs")

    if anchor is not None:
        previous, anchored, anchor_weight = anchor[0], torch.as_tensor(anchor[1], dtype=torch.bool), float(anchor[2])
        if anchored.shape != (len(train),):
            raise ValueError(f"anchor marks {tuple(anchored.shape)} pairs, expected ({len(train)},)")
        if anchor_weight <= 0:
            anchor = None

    global_bs = min(cfg.batch_size, len(train) - len(train) % world) if len(train) < cfg.batch_size else cfg.batch_size
    if global_bs < world:
        raise TrainingDataError(f"{len(train)} training pairs cannot feed {world} processes")
    steps_per_epoch = len(train) // global_bs
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    local_bs = global_bs // world

    set_seed(cfg.seed)  # same init-time RNG everywhere; per-process dropout seeds below
    if cfg.freeze_encoder:
        if not hasattr(model, "freeze_encoder"):
            raise TypeError(f"freeze_encoder=True needs an AceModel, got {type(model).__name__}")
        model.freeze_encoder()
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                                           min_lr_ratio=cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    if anchor is not None:
        previous.to(accelerator.device)
    if cfg.freeze_encoder and cfg.encoder_cache_gb > 0:
        encoder = accelerator.unwrap_model(model).encoder
        train.encoder_states = cache_encoder_states(encoder, train, budget_gb=cfg.encoder_cache_gb,
                                                    progress=cfg.progress and main)
        if train.encoder_states is None and main:
            tqdm.write(f"frozen encoder outputs of {len(train)} queries exceed encoder_cache_gb="
                       f"{cfg.encoder_cache_gb}: encoding every batch instead")
    state = _StepState()
    accelerator.register_for_checkpointing(scheduler, state)
    set_seed(cfg.seed + rank)  # independent dropout per process

    log = _JsonlLog(paths.train_log, enabled=main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    latest = latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        saved = json.loads((latest / "trainer_state.json").read_text())
        saved_cfg = saved["train_config"]
        if saved.get("num_train_pairs") != len(train):
            raise ValueError(f"cannot resume from {latest}: it was trained on {saved.get('num_train_pairs')} pairs, "
                             f"now {len(train)} are given (the data position would not match)")
        changed = [k for k in _TRAJECTORY_FIELDS if saved_cfg.get(k) != to_dict(cfg)[k]]
        if changed:
            raise ValueError(f"cannot resume from {latest}: TrainConfig fields changed since the checkpoint: "
                             f"{', '.join(f'{k} {saved_cfg.get(k)!r} -> {to_dict(cfg)[k]!r}' for k in changed)}")
        accelerator.load_state(str(latest))
        log.truncate_after(state.step)
    elif main:
        if paths.train_log.exists():
            paths.train_log.unlink()
        for _, d in _step_dirs(ckpt_root):
            shutil.rmtree(d)
    accelerator.wait_for_everyone()

    def evaluate() -> dict[str, float]:
        """Sharded constrained beam search on the validation split; every process gets the metrics."""
        shard = torch.arange(rank, len(val), world)
        ranked = rank_items(accelerator.unwrap_model(model), val.input_ids[shard], val.attention_mask[shard],
                            id_tokenizer.trie.flat(), vocab, num_beams=cfg.num_beams, top_k=cfg.eval_top_k,
                            batch_size=cfg.eval_batch_size, progress=cfg.progress and main)
        pieces = gather_object([(shard.tolist(), ranked.tolist())])
        order, rows = [], []
        for idx, rk in pieces:
            order.extend(idx)
            rows.extend(rk)
        rows = np.asarray(rows, dtype=np.int64)[np.argsort(order)]
        return metrics_from_rows(rows, val.rows.numpy())

    def save_checkpoint() -> None:
        out = ckpt_root / f"step-{state.step}"
        accelerator.save_state(str(out))
        if main:  # trainer_state.json last and atomically: its presence marks a complete checkpoint
            tmp = out / "trainer_state.json.tmp"
            tmp.write_text(json.dumps({
                "step": state.step, "epoch": state.step // steps_per_epoch, "batch_in_epoch": state.step % steps_per_epoch,
                "total_steps": total_steps, "num_train_pairs": len(train), "best_step": state.best_step,
                "train_config": to_dict(cfg)}, indent=1))
            tmp.replace(out / "trainer_state.json")
            keep = {s for s, _ in _step_dirs(ckpt_root)[-cfg.keep_checkpoints:]} | {state.best_step}
            for s, d in _step_dirs(ckpt_root):
                if s not in keep:
                    shutil.rmtree(d)
        accelerator.wait_for_everyone()

    def maybe_eval(force: bool = False) -> tuple[dict | None, bool]:
        """(metrics or None, whether this step is the new best)."""
        if val is None:
            return None, False
        if not force and not (cfg.eval_every and state.step % cfg.eval_every == 0):
            return None, False
        metrics = evaluate()
        value = metrics[cfg.best_metric]
        improved = state.best_value is None or value > state.best_value
        if improved:
            state.best_value, state.best_step, state.best_metrics = value, state.step, metrics
        log.write({"step": state.step, "eval": metrics, "best_step": state.best_step})
        return metrics, improved

    model.train()
    end = total_steps if stop_at is None else min(total_steps, stop_at)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not (cfg.progress and main),
               dynamic_ncols=True)
    final_metrics = None
    running = torch.zeros(5, device=accelerator.device)  # sums of loss, ce, kl, kd, anchor since the last log
    n_running = 0
    while state.step < end:
        epoch, pos = divmod(state.step, steps_per_epoch)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        index = perm[pos * global_bs:(pos + 1) * global_bs][rank * local_bs:(rank + 1) * local_bs]
        batch = {k: v.to(accelerator.device) for k, v in train.batch(index).items()}
        if cfg.query_token_dropout > 0:
            batch["attention_mask"] = query_token_dropout(batch["attention_mask"], cfg.query_token_dropout)
        distill = None
        if cfg.distill_weight > 0:
            ids, probs = teacher_model.targets(teacher_vectors[index], train.rows[index])
            distill = (ids.to(accelerator.device), probs.to(accelerator.device), cfg.distill_weight)
        anchor_args = None
        if anchor is not None and anchored[index].any():
            rows = anchored[index].to(accelerator.device)
            anchor_args = (previous.logits(batch), rows, anchor_weight)
        with accelerator.autocast():
            out = ace_loss(model, batch, omega=cfg.omega, distill=distill, anchor=anchor_args)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"loss is {out.loss.item()} at step {state.step}; lower lr or check the data")
        accelerator.backward(out.loss)
        grad_norm = None
        if cfg.grad_clip > 0 and accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        zero = torch.zeros((), device=accelerator.device)
        kd = out.kd if out.kd is not None else zero
        anc = out.anchor if out.anchor is not None else zero
        running += torch.stack([out.loss.detach().float(), out.ce.float(), out.kl.float(), kd.float(), anc.float()])
        n_running += 1
        bar.update(1)

        if state.step % cfg.log_every == 0 or state.step == end:
            avg = accelerator.reduce(running / n_running, reduction="mean").tolist()
            rec = {"step": state.step, "epoch": state.step / steps_per_epoch, "loss": avg[0], "ce": avg[1],
                   "kl": avg[2], "lr": scheduler.get_last_lr()[0]}
            if cfg.distill_weight > 0:
                rec["kd"] = avg[3]
            if anchor is not None:
                rec["anchor"] = avg[4]
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            log.write(rec)
            bar.set_postfix(loss=f"{avg[0]:.4f}", lr=f"{rec['lr']:.2e}")
            running.zero_()
            n_running = 0
        metrics, improved = maybe_eval(force=state.step == total_steps)
        if metrics is not None:
            final_metrics = metrics
        if state.step % cfg.checkpoint_every == 0 or state.step == end or improved:
            save_checkpoint()  # a new best is always checkpointed so that it can be exported
    bar.close()

    if state.step < total_steps:  # stopped early on request: the checkpoint is the artefact
        return TrainResult(step=state.step, model_dir=paths.model, best_step=state.best_step,
                           best_metrics=state.best_metrics, final_metrics=final_metrics, history=log.records,
                           seconds=time.time() - t0)

    if val is not None and final_metrics is None:
        final_metrics = evaluate()  # resumed at the final step: its eval ran in the killed process
    unwrapped = accelerator.unwrap_model(model)
    export_step = state.step
    if state.best_step is not None and state.best_step != state.step:
        best_dir = ckpt_root / f"step-{state.best_step}"
        accelerator.load_state(str(best_dir))  # restores best weights (and state); step is reset below
        export_step = state.best_step
        state.step = total_steps
    if main:
        _save_model(unwrapped, paths.model)
        (paths.model / "training_state.json").write_text(json.dumps(
            {"exported_step": export_step, "total_steps": total_steps, "best_metric": cfg.best_metric,
             "best_metrics": state.best_metrics, "train_config": to_dict(cfg)}, indent=1))
    accelerator.wait_for_everyone()
    return TrainResult(step=total_steps, model_dir=paths.model, best_step=state.best_step,
                       best_metrics=state.best_metrics, final_metrics=final_metrics, history=log.records,
                       seconds=time.time() - t0)


train = train_retriever  # the name docs/ARCHITECTURE.md uses for this entry point


def _save_model(model: torch.nn.Module, out: Path) -> None:
    """save_pretrained into ``out`` (the model must be a Hugging Face PreTrainedModel or offer the method)."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; train an AceModel (PreTrainedModel)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))


# ----------------------------------------------------------------------------- identifier-space pretraining


def pretrain_identifier_prefixes(model: torch.nn.Module, query_tokenizer, vocab, texts: Sequence[str],
                                 prefixes: np.ndarray, cfg: TrainConfig, *, epochs: int = 1,
                                 device: str = "cpu", progress: bool = False) -> list[float]:
    """Issue 19, lever 4: train ``model`` on (text, identifier prefix) pairs before the item pairs.

    ``prefixes`` (P, M+1) are the codes (k, v1..vM) of each text's own embedding under the fitted
    identifier tokenizer (``SemanticIdTokenizer.encode_prefixes``); the u level has no label. Uses
    ``cfg``'s batch size, lr, warmup, omega, weight decay, seed and freeze_encoder; a fresh optimiser
    (the item training starts its own). Returns the loss of every step."""
    from ace.training.losses import IGNORE_INDEX

    prefixes = np.asarray(prefixes)
    L = vocab.length
    if prefixes.ndim != 2 or prefixes.shape[0] != len(texts) or not 1 <= prefixes.shape[1] < L:
        raise ValueError(f"prefixes must have shape ({len(texts)}, < {L}), got {prefixes.shape}")
    if len(texts) < 1 or epochs < 1:
        raise TrainingDataError(f"pretraining needs texts and epochs >= 1, got {len(texts)} texts, {epochs} epochs")
    n_pre = prefixes.shape[1]
    codes = np.concatenate([prefixes, np.zeros((len(texts), L - n_pre), dtype=np.int64)], 1)
    dec, labels = identifier_targets(codes, vocab)                                   # (P, L) each
    labels[:, n_pre:] = IGNORE_INDEX                                                  # no u target
    input_ids, attention_mask = tokenize_queries(query_tokenizer, texts,
                                                 query_length(model, query_tokenizer, cfg.max_query_length))
    if cfg.freeze_encoder:
        model.freeze_encoder()
    model.to(device).train()
    optimizer = _optimizer(model, cfg)
    bs = min(cfg.batch_size, len(texts))
    total = epochs * (len(texts) // bs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=min(cfg.warmup_steps, total // 10 + 1), total_steps=total,
                                           min_lr_ratio=cfg.min_lr_ratio))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    bar = tqdm(total=total, desc="pretrain (identifier space)", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=gen)
        for s in range(0, len(order) - bs + 1, bs):
            idx = order[s:s + bs]
            mask = attention_mask[idx]
            width = max(1, int(mask.sum(1).max()))
            batch = {"input_ids": input_ids[idx, :width].to(device), "attention_mask": mask[:, :width].to(device),
                     "decoder_input_ids": dec[idx].to(device), "labels": labels[idx].to(device)}
            if cfg.query_token_dropout > 0:
                batch["attention_mask"] = query_token_dropout(batch["attention_mask"], cfg.query_token_dropout)
            loss = ace_loss(model, batch, cfg.omega).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
    bar.close()
    return losses
