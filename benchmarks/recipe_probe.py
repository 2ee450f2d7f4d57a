"""Probes behind the ACE recipe on a caption-proxy run folder (made by train.py / ace.bench quality).

    python benchmarks/recipe_probe.py oracle --run runs/flickr30k_proxy
    python benchmarks/recipe_probe.py train  --run runs/flickr30k_proxy --steps 500 [--omega 0] [--distill 1]

``oracle`` (numpy, no training): how far each identifier structure is from exact dual-tower search,
with item prototypes = mean MiniLM vector of the item's training queries (the DT doc+queries vector):
  - additive: item ~ sum over levels of per-code mean residuals (what a prefix-independent output
    layer can express);
  - tree search: beam search over trie prefixes scored by the prefix's mean prototype (what a decoder
    that learned prefix-conditioned scoring could reach), beams 10 and 50.
``train``: the decoder-only recipe (frozen MiniLM encoder) fast: the S fused encoder layers of every
query are computed once and cached, then only the decoder trains; held-out R@k by trie-constrained
beam search. Options: R-Drop weight, the prefix-prototype teacher (ace/training/distill.py), steps, lr.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.model.decoding import constrained_beam_search  # noqa: E402
from ace.training.distill import PrefixTeacher, distillation_loss  # noqa: E402
from ace.data.encoders import TextEncoder, minilm_path  # noqa: E402
from ace.training.losses import rdrop_kl  # noqa: E402
from ace.model.config import AceConfig  # noqa: E402
from ace.model.modeling import AceModel  # noqa: E402
from ace.arrays import unit_rows  # noqa: E402
from ace.model.tokens import IdentifierVocab, QueryTokenizer  # noqa: E402
from ace.training.pairs import identifier_targets  # noqa: E402
from ace.run_folder import RunPaths, read_pairs  # noqa: E402
from identifiers.semantic_ids import SemanticIdTokenizer  # noqa: E402


def load(run: Path, cache: Path):
    """Identifiers, train/test pairs as item rows, and MiniLM vectors of every query (cached)."""
    tok = SemanticIdTokenizer.load(RunPaths(run).identifiers)
    tr, te = (read_pairs(p) for p in (RunPaths(run).train_queries, RunPaths(run).test_queries))
    row = {i: n for n, i in enumerate(tok.item_ids)}
    f = cache / f"{run.name}_minilm.npz"
    if f.is_file():
        z = np.load(f)
        qtr, qte = z["qtr"], z["qte"]
    else:
        enc = TextEncoder()
        qtr, qte = enc.encode([q for q, _ in tr]), enc.encode([q for q, _ in te])
        np.savez(f, qtr=qtr, qte=qte)
    return tok, tr, te, np.array([row[i] for _, i in tr]), np.array([row[i] for _, i in te]), qtr, qte


def recall(ranked: np.ndarray, y: np.ndarray) -> dict:
    hit = ranked[:, :10] == y[:, None]
    return {"R@1": 100 * hit[:, 0].mean(), "R@10": 100 * hit.any(1).mean()}


def oracle(args, run, cache):
    tok, _, _, ytr, yte, qtr, qte = load(run, cache)
    codes, (N, L) = tok.codes, tok.codes.shape
    proto = np.zeros((N, qtr.shape[1]))
    np.add.at(proto, ytr, qtr)
    proto = unit_rows(proto)
    out = {"DT doc+queries": recall(np.argsort(-(qte @ proto.T), 1), yte)}
    approx = np.zeros_like(proto)
    for level in range(L):
        R, cnt = np.zeros((tok.level_sizes[level], proto.shape[1])), np.zeros(tok.level_sizes[level])
        np.add.at(R, codes[:, level], proto - approx)
        np.add.at(cnt, codes[:, level], 1)
        approx = approx + (R / cnt.clip(1)[:, None])[codes[:, level]]
    out["additive per-code residuals"] = recall(np.argsort(-(qte @ approx.T), 1), yte)
    groups = []
    for level in range(L):
        g: dict = {}
        for n in range(N):
            g.setdefault(tuple(codes[n, :level + 1]), []).append(n)
        groups.append({k: unit_rows(proto[v].mean(0)) for k, v in g.items()})
    children = [{} for _ in range(L)]
    for level in range(L):
        for k in groups[level]:
            children[level].setdefault(k[:-1], []).append(k)
    for B in args.beams:
        top1 = []
        for q in qte:
            beams = [()]
            for level in range(L):
                cand = [k for p in beams for k in children[level][p]]
                score = np.array([q @ groups[level][k] for k in cand])
                beams = [cand[i] for i in np.argsort(-score)[:B]]
            top1.append(beams[0])
        hit = np.array([top1[i] == tuple(codes[yte[i]]) for i in range(len(yte))])
        out[f"prefix-mean tree search, beams {B}"] = {"R@1": 100 * hit.mean()}
    for k, v in out.items():
        print(f"{k:40s} " + "  ".join(f"{m} {x:.1f}" for m, x in v.items()))


def train(args, run, cache):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok, tr, te, ytr, yte, qtr, _ = load(run, cache)
    vocab = IdentifierVocab(tok.level_sizes)
    enc = minilm_path()
    cfg = AceConfig(d_model=384, n_heads=6, encoder_layers=3, decoder_layers=args.decoder_layers, ffn_dim=1024,
                    dropout=0.1, level_sizes=tok.level_sizes, pretrained_encoder=enc, max_query_length=40)
    model = AceModel(cfg)
    model.freeze_encoder()
    qtok = QueryTokenizer.from_pretrained(enc, max_length=40)

    def states(texts):  # (n, S, W, d) fp16 fused encoder layers, computed once
        b = qtok(texts, max_length=40)
        W = int(b.attention_mask.sum(1).max())
        ids, mask = b.input_ids[:, :W].long(), b.attention_mask[:, :W].long()
        with torch.no_grad():
            out = [model.encoder(input_ids=ids[s:s + 128], attention_mask=mask[s:s + 128]).layer_states.half()
                   for s in range(0, len(texts), 128)]
        return torch.cat(out), mask

    f = cache / f"{run.name}_states.pt"
    if f.is_file():
        (Xtr, Mtr), (Xte, Mte) = torch.load(f)
    else:
        (Xtr, Mtr), (Xte, Mte) = states([q for q, _ in tr]), states([q for q, _ in te])
        torch.save(((Xtr, Mtr), (Xte, Mte)), f)
    n_eval = args.eval_queries or len(yte)
    dec_in, labels = identifier_targets(tok.codes[ytr], vocab)
    teacher = PrefixTeacher.from_queries(qtr, ytr, tok.codes, vocab, tau=args.tau) if args.distill else None
    qv = torch.as_tensor(qtr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=args.lr)
    warm = max(1, min(200, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    def logits_of(layers, mask, dii):
        return model.decoder(dii, model.decoder.memory(layers), mask.bool()[:, None, None, :])

    def evaluate():
        model.eval()
        ranked = []
        with torch.no_grad():
            for s in range(0, n_eval, 200):
                layers, mask = Xte[s:min(s + 200, n_eval)].float(), Mte[s:min(s + 200, n_eval)]
                model.encode = lambda ids, am, L=layers: L  # cached encoder states
                items, _ = constrained_beam_search(model, torch.zeros_like(mask), mask, tok.trie.flat(), vocab,
                                                   num_beams=args.beams[0], top_k=10)
                ranked.append(np.asarray(items))
        del model.encode
        model.train()
        return recall(np.concatenate(ranked), yte[:n_eval])

    g = torch.Generator().manual_seed(args.seed)
    step, t0 = 0, time.time()
    model.train()
    while step < args.steps:
        perm = torch.randperm(len(ytr), generator=g)
        for s in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[s:s + args.batch_size]
            mask = Mtr[idx]
            W = int(mask.sum(1).max())
            layers, mask, dii, lab = Xtr[idx][:, :, :W].float(), mask[:, :W], dec_in[idx], labels[idx]
            if args.omega > 0:
                lg = logits_of(layers.repeat(2, 1, 1, 1), mask.repeat(2, 1), dii.repeat(2, 1))
                a, b = lg.chunk(2)
                loss = F.cross_entropy(lg.flatten(0, 1), lab.repeat(2, 1).flatten()) + args.omega * rdrop_kl(a, b)
            else:
                lg = logits_of(layers, mask, dii)
                loss = F.cross_entropy(lg.flatten(0, 1), lab.flatten())
            if teacher is not None:
                ids, probs = teacher.targets(qv[idx], torch.as_tensor(ytr[idx.numpy()]))
                passes = 2 if args.omega > 0 else 1
                loss = loss + args.distill * distillation_loss(lg, ids.repeat(passes, 1, 1), probs.repeat(passes, 1, 1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                print(f"EVAL step {step}", {k: round(v, 1) for k, v in evaluate().items()}, flush=True)
            if step >= args.steps:
                break


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["oracle", "train"])
    ap.add_argument("--run", required=True, help="run folder with identifiers/, train_queries.json, test_queries.json")
    ap.add_argument("--cache", default="benchmarks/out/recipe_probe")
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--omega", type=float, default=0.0)
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--tau", type=float, default=25.0)
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-queries", type=int, default=0, help="first N test queries (0 = all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run, cache = Path(args.run), Path(args.cache)
    for f in (RunPaths.IDENTIFIERS, RunPaths.TRAIN_QUERIES, RunPaths.TEST_QUERIES):
        if not (run / f).exists():
            sys.exit(f"error: {run / f} is missing (a caption-proxy run folder is needed)")
    cache.mkdir(parents=True, exist_ok=True)
    (oracle if args.what == "oracle" else train)(args, run, cache)


if __name__ == "__main__":
    main()
