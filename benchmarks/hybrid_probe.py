"""Probe of the hybrid operating point on a trained caption-proxy run (issue 19): which fused score
ranks the generative top-B best? Dumps, for the held-out scorer queries (validation) and the test
queries, the candidates, their per-level log-probabilities at several softmax temperatures and
cosines against several item vectors, and every item's prior log-prob (for a PMI fusion), then fits
each fusion on validation and scores it on test.

    python benchmarks/hybrid_probe.py RUN_DIR [--beams 50] [--out probe.npz] [--dt-captions FILE]

``--dt-captions``: also the dual tower over the whole corpus with the same dense features (mean of
document + generated-query vectors, max over them, and their sum), so that a fusion's gain can be
told apart from a gain that a dual tower gets from the same item vectors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ace.metrics import retrieval_metrics

TEMPS = (1.0, 2.0, 4.0, 8.0)


@torch.inference_mode()
def per_level_logprobs(model, memory, mask, tokens, levels, query, temps=TEMPS):
    """(T, B, P, levels) teacher-forced log-softmax of each level's token at each temperature."""
    from ace.model.decoding import BOS

    B, P = tokens.shape[:2]
    out = torch.zeros(len(temps), B, P, levels)
    prev = torch.full((B, P), BOS, dtype=torch.long)
    cache: list = []
    for d in range(levels):
        logits, cache = model.decoder.step(prev, d, memory, mask, cache, query=query)
        prev = tokens[:, :, d]
        for ti, t in enumerate(temps):
            out[ti, :, :, d] = torch.log_softmax(logits.float() / t, -1).gather(2, prev[..., None])[..., 0]
    return out


def dump(run_dir: Path, beams: int, out: Path):
    from ace.model.decoding import constrained_beam_search
    from ace.newitems.candidates import sentence_vectors
    from ace.newitems.hybrid import encode_texts, item_texts, mean_vectors
    from ace.run_folder import RunPaths, load_run_corpus, read_pairs
    from ace.serving.retriever import Retriever

    paths = RunPaths(run_dir)
    r = Retriever.from_run(run_dir, device="cpu", fallback=False)
    model, qtok, vocab = r.model.eval(), r.query_tokenizer, r.vocab
    tok = r.id_tokenizer
    ids = list(tok.trie.item_ids)
    row = {i: k for k, i in enumerate(ids)}
    tokens_all = torch.as_tensor(vocab.encode(np.asarray(tok.trie.codes)), dtype=torch.long)
    levels = vocab.length - 1
    held = read_pairs(paths.scorer_queries)
    test = read_pairs(paths.test_queries)
    corpus = {it.item_id: it for it in load_run_corpus(run_dir, RunPaths.CORPUS_TRAIN).items}
    held_set = set(map(tuple, held))
    kept, allq = {}, {}
    for q, iid in read_pairs(paths.train_queries):
        allq.setdefault(iid, []).append(q)
        if (q, iid) not in held_set:
            kept.setdefault(iid, []).append(q)
    cache = {}

    def enc(texts):
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for s in range(0, len(new), 512):
            for t, v in zip(new[s:s + 512], encode_texts(model, qtok, new[s:s + 512])):
                cache[t] = v
        return np.stack([cache[t] for t in texts])

    desc = {i: corpus[i].description() for i in ids}
    vecs = {}
    for name, qmap in (("fit", kept), ("serve", allq)):
        vecs[f"dq_{name}"] = mean_vectors([item_texts(desc[i], qmap.get(i, []), "doc_plus_queries") for i in ids], enc, ids)
    vecs["doc"] = mean_vectors([item_texts(desc[i], [], "document") for i in ids], enc, ids)
    # every text of an item (for max-sim): per item, a list of rows into one text matrix
    res = {k: v for k, v in vecs.items()}
    res.update(item_priors(model, qtok, tokens_all, levels, [q for qs in kept.values() for q in qs]))
    for split, pairs, qmap in (("val", held, kept), ("test", test, allq)):
        qs = [q for q, _ in pairs]
        gold = np.asarray([row[i] for _, i in pairs])
        R, LP, QV, MAXS = [], [], [], []
        for s in range(0, len(qs), 100):
            e = qtok(qs[s:s + 100], max_length=model.config.max_query_length)
            st: dict = {}
            items, _ = constrained_beam_search(model, e.input_ids, e.attention_mask, r.trie(), vocab, num_beams=beams,
                                               top_k=beams, state=st)
            items = items.numpy()
            qv = sentence_vectors(st["last_hidden"], e.attention_mask)
            toks = tokens_all[np.maximum(items, 0)]
            lp = per_level_logprobs(model, st["memory"], st["mask"], toks, levels, st["query"]).numpy()
            ms = np.zeros(items.shape, np.float32)
            for b in range(items.shape[0]):
                for p in range(items.shape[1]):
                    if items[b, p] >= 0:
                        iid = ids[items[b, p]]
                        tv = enc(item_texts(desc[iid], qmap.get(iid, []), "doc_plus_queries"))
                        ms[b, p] = float((tv @ qv[b]).max())
            R.append(items); LP.append(lp); QV.append(qv); MAXS.append(ms)
            print(split, s + len(items), "/", len(qs), file=sys.stderr, flush=True)
        res[f"{split}_rows"] = np.concatenate(R)
        res[f"{split}_lp"] = np.concatenate(LP, 1)
        res[f"{split}_qv"] = np.concatenate(QV)
        res[f"{split}_maxsim"] = np.concatenate(MAXS)
        res[f"{split}_gold"] = gold
    np.savez(out, **res)


@torch.inference_mode()
def item_priors(model, qtok, tokens_all, levels, train_queries, n_queries=32, seed=0):
    """Each item's identifier log-prob without a query of its own (a popularity prior, for a PMI-style fusion
    ``lp - b * prior``): ``prior_null`` under the one-word query "a" (an empty query is refused); ``prior_mean``:
    the mean over ``n_queries`` training queries drawn at random (seeded). Both (N,), teacher-forced, softmax
    temperature 1."""
    from ace.newitems.candidates import encoder_state

    rng = np.random.default_rng(seed)
    drawn = [train_queries[i] for i in rng.choice(len(train_queries), n_queries, replace=False)]
    out = {}
    for name, qs in (("prior_null", ["a"]), ("prior_mean", drawn)):
        acc = np.zeros(len(tokens_all))
        for q in qs:
            e = qtok([q], max_length=model.config.max_query_length)
            st = encoder_state(model, e.input_ids, e.attention_mask)   # (no decoding: the teacher-forced pass only)
            lp = per_level_logprobs(model, st["memory"], st["mask"], tokens_all[None], levels, st["query"],
                                    temps=(1.0,))
            acc += lp[0, 0].sum(-1).numpy()
        out[name] = acc / len(qs)
    return out


def add_projected_queries(run_dir: Path, npz: Path):
    """Adds ``{split}_qp``: the prototype heads' learned query projection, normalise(P pooled_query), per query."""
    from ace.run_folder import RunPaths, read_pairs
    from ace.serving.retriever import Retriever

    z = dict(np.load(npz))
    if "test_qp" in z:
        return
    r = Retriever.from_run(run_dir, device="cpu", fallback=False)
    m, qtok, paths = r.model.eval(), r.query_tokenizer, RunPaths(run_dir)
    head = m.decoder.prototypes
    if head is None:
        return
    for split, pairs in (("val", read_pairs(paths.scorer_queries)), ("test", read_pairs(paths.test_queries))):
        out = []
        with torch.inference_mode():
            for s in range(0, len(pairs), 200):
                e = qtok([q for q, _ in pairs[s:s + 200]], max_length=m.config.max_query_length)
                q = m.prototype_query(m.encode(e.input_ids, e.attention_mask), e.attention_mask)
                out.append(torch.nn.functional.normalize(head.proj(q.float()), dim=-1).numpy())
        z[f"{split}_qp"] = np.concatenate(out)
    np.savez(npz, **z)


def evaluate(order_rows, gold):
    """R@1 / R@5 / R@10 / MRR (@10) of ranked candidate rows (Q, P) against gold rows (Q,): ace.metrics."""
    m = retrieval_metrics(np.asarray(order_rows).tolist(), np.asarray(gold).tolist())
    return {**m, "MRR": m["MRR@10"]}


def listwise_fit(X, rows, gold, iters=300):
    """Weights of a linear score X @ w maximising the softmax likelihood of the gold candidate (LBFGS)."""
    Xt, mask = torch.tensor(X, dtype=torch.float64), torch.tensor(rows >= 0)
    hit = rows == gold[:, None]
    g, has = torch.tensor(hit.argmax(1)), torch.tensor(hit.any(1))
    w = torch.ones(X.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=iters)

    def closure():
        opt.zero_grad()
        loss = -torch.log_softmax((Xt @ w).masked_fill(~mask, -1e9), 1)[has, g[has]].mean()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach().numpy()


def analyse(npz: Path):
    z = dict(np.load(npz))
    grid = [0.0] + list(np.geomspace(0.25, 512, 34))

    def feats(split, vec):
        rows, qv = z[f"{split}_rows"], z[f"{split}_qv"]
        v = z[vec][np.maximum(rows, 0)]
        return np.einsum("bpd,bd->bp", v, qv)

    def rank(split, score):
        rows = z[f"{split}_rows"]
        score = np.where(rows >= 0, score, -np.inf)
        order = np.argsort(-score, 1, kind="stable")
        return np.take_along_axis(rows, order, 1)

    out = []

    def fit_and_test(name, make):  # make(split, params) -> score; params over a grid
        best = None
        for params in make.grid:
            m = evaluate(rank("val", make("val", params)), z["val_gold"])
            key = (m["MRR"], m["R@1"])
            if best is None or key > best[0]:
                best = (key, params, m)
        t = evaluate(rank("test", make("test", best[1])), z["test_gold"])
        out.append((name, best[1], best[2], t))
        print(f"{name:40s} params={best[1]}  val R@1 {best[2]['R@1']:.1f} MRR {best[2]['MRR']:.1f} | "
              f"test R@1 {t['R@1']:.2f} R@5 {t['R@5']:.1f} R@10 {t['R@10']:.1f} MRR {t['MRR']:.1f}")

    cos = {"val": feats("val", "dq_fit"), "test": feats("test", "dq_serve")}
    cdoc = {s: feats(s, "doc") for s in ("val", "test")}

    def lp(split, ti=0, a=(1, 1, 1)):
        return (z[f"{split}_lp"][ti] * np.asarray(a)).sum(-1)

    f = lambda s, p: lp(s); f.grid = [(0,)]; fit_and_test("lp only (the generative order)", f)
    f = lambda s, p: lp(s) + p[0] * cos[s]; f.grid = [(w,) for w in grid]; fit_and_test("lp + w cos_dq (current)", f)
    f = lambda s, p: cos[s] + 0 * p[0]; f.grid = [(0,)]; fit_and_test("cos_dq only (DT within candidates)", f)
    f = lambda s, p: lp(s) * 0 + z[f"{s}_maxsim"]; f.grid = [(0,)]; fit_and_test("maxsim only", f)
    for ti, T in enumerate(TEMPS):
        f = lambda s, p, ti=ti: lp(s, ti) + p[0] * cos[s]; f.grid = [(w,) for w in grid]
        fit_and_test(f"lp(T={T}) + w cos_dq", f)
    f = lambda s, p: lp(s, 0, p[1]) + p[0] * cos[s]
    f.grid = [(w, a) for w in grid[::2] for a in [(1, 1, 1), (1, 1, 0), (1, 0, 0), (0, 1, 1), (0, 0, 1), (1, 1, 0.5),
                                                   (0.5, 1, 1), (1, 0.5, 0.5), (2, 1, 1)]]
    fit_and_test("per-level a . lp + w cos_dq", f)
    f = lambda s, p: lp(s) + p[0] * cos[s] + p[1] * cdoc[s]
    f.grid = [(w, v) for w in grid[::2] for v in [0, 4, 8, 16, 32, 64]]
    fit_and_test("lp + w cos_dq + v cos_doc", f)
    f = lambda s, p: lp(s) + p[0] * cos[s] + p[1] * z[f"{s}_maxsim"]
    f.grid = [(w, v) for w in grid[::2] for v in [0, 4, 8, 16, 32, 64, 128]]
    fit_and_test("lp + w cos_dq + v maxsim", f)
    if "test_qp" in z:  # the prototype heads' learned query projection against the same item vectors
        cp = {s: np.einsum("bpd,bd->bp", z[v][np.maximum(z[f"{s}_rows"], 0)], z[f"{s}_qp"])
              for s, v in (("val", "dq_fit"), ("test", "dq_serve"))}
        f = lambda s, p: cp[s]; f.grid = [(0,)]; fit_and_test("cos(P q, dq) only", f)
        f = lambda s, p: lp(s) + p[0] * cos[s] + p[1] * cp[s]
        f.grid = [(w, v) for w in grid[::2] for v in [0, 16, 32, 64, 128, 256]]
        fit_and_test("lp + w cos_dq + v cos(P q, dq)", f)
    if "prior_null" in z:  # PMI: the identifier's log-prob given the query minus b times its prior
        for pr in ("prior_null", "prior_mean"):
            prior = {s: z[pr][np.maximum(z[f"{s}_rows"], 0)] for s in ("val", "test")}
            f = lambda s, p, prior=prior: lp(s) - p[0] * prior[s]; f.grid = [(b,) for b in (0, .25, .5, .75, 1.)]
            fit_and_test(f"lp - b {pr} (pure, PMI)", f)
            f = lambda s, p, prior=prior: lp(s) - p[1] * prior[s] + p[0] * cos[s]
            f.grid = [(w, b) for w in grid[::2] for b in (0, .25, .5, .75, 1.)]
            fit_and_test(f"lp - b {pr} + w cos_dq", f)
    # reciprocal-rank fusion of the generative order and the cosine order
    def rrf(s, p):
        rows = z[f"{s}_rows"]
        g = np.argsort(np.argsort(-np.where(rows >= 0, lp(s), -np.inf), 1, kind="stable"), 1)
        c = np.argsort(np.argsort(-np.where(rows >= 0, cos[s], -np.inf), 1, kind="stable"), 1)
        return 1 / (p[0] + g) + p[1] / (p[0] + c)
    rrf.grid = [(k, b) for k in [1, 5, 20, 60] for b in [0.5, 1, 2, 4]]
    fit_and_test("RRF(gen rank, cos rank)", rrf)
    # listwise softmax regression over the candidates (per-level log-probs at T=1, their sum at T=4, cos_dq):
    # the best linear fusion of these features, fitted on validation, and on test itself as an upper bound
    for name, fit_on in (("listwise fit on validation", "val"), ("listwise fit on TEST (upper bound)", "test")):
        X = {s: np.concatenate([z[f"{s}_lp"][0], z[f"{s}_lp"][2].sum(-1, keepdims=True), cos[s][..., None]], -1)
             for s in ("val", "test")}
        w = listwise_fit(X[fit_on], z[f"{fit_on}_rows"], z[f"{fit_on}_gold"])
        t = evaluate(rank("test", X["test"] @ w), z["test_gold"])
        print(f"{name:40s} weights={np.round(w, 2).tolist()} | test R@1 {t['R@1']:.2f} R@10 {t['R@10']:.1f}")
    gold_in = {s: float((z[f"{s}_rows"] == z[f"{s}_gold"][:, None]).any(1).mean() * 100) for s in ("val", "test")}
    print("gold in candidates:", gold_in)
    return out


def dt_reference(captions: Path, weights=(0.25, 0.5, 1.0, 2.0)):
    """Whole-corpus DT R@1 (caption proxy, the quality bench's MiniLM embeddings): the document+queries mean
    (``dt_doc_plus_queries``' item vectors), max-sim over the document and generated queries, mean + a * max-sim."""
    from ace.arrays import unit_rows
    from ace.bench.baselines import doc_plus_queries_vectors, encode_split, query_targets
    from ace.data.encoders import MINILM, TextEncoder
    from ace.data.importers import load_proxy_split

    split = load_proxy_split(captions)
    emb = encode_split(split, TextEncoder(MINILM), encoder_name=MINILM)
    row = {iid: i for i, iid in enumerate(split.item_ids)}
    Q = unit_rows(emb.test_queries)
    S = Q @ doc_plus_queries_vectors(split, emb).T
    M = Q @ unit_rows(emb.documents).T                       # max-sim: the best of the item's texts
    for (iid, _), v in zip(split.train_queries, unit_rows(emb.train_queries)):
        M[:, row[iid]] = np.maximum(M[:, row[iid]], Q @ v)
    gold = np.asarray([row[iid] for iid in query_targets(split)])
    r1 = lambda x: 100 * float((x.argmax(1) == gold).mean())
    print(f"DT whole corpus: mean (DT document+queries) R@1 {r1(S):.2f}; max-sim {r1(M):.2f}; "
          + "; ".join(f"mean + {a:g} max-sim {r1(S + a * M):.2f}" for a in weights))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--beams", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--dt-captions", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or a.run_dir / "hybrid_probe.npz"
    if not a.analyse_only:
        dump(a.run_dir, a.beams, out)
    add_projected_queries(a.run_dir, out)
    analyse(out)
    if a.dt_captions:
        dt_reference(a.dt_captions)
