"""Why merged search loses added items, and what the untrained-level rule does (quality.md section 11.3).

    python benchmarks/merged_search_probe.py ../shared/data/flickr30k/flickr30k_val.json \
        --config configs/flickr30k_80_20_hybrid.yaml --work benchmarks/out/merged_probe/work

On a copy of the config's trained run (its first ``corpus.limit`` items), every other item of the caption
file is added through ``Retriever.add_items`` (as benchmarks/bench_new_items.py does). Then:

1. the teacher-forced log-prob of each level of the gold identifier, for the added items' test queries
   and for old items' test queries, and how many added items share their k / (k, v1) / (k, v1, v2)
   prefix with a trained item;
2. merged (hybrid) search R@1 / R@10 of both query sets, and of each path alone, under each ``--rules``
   rule for added items (``use_rule``, this process only): "best (committed)" = ``hybrid.added_levels:
   trained`` (levels past the trained depth at the best per-level log-prob of the query's candidates,
   ``untrained_completion``), "mean" = the same with the mean per-level log-prob, "no trained level" =
   ``added_levels: none``;
3. for scale, DT document+queries over all items of the file on the added items' test queries;
4. with ``--boosts B ...``: each rule's merged rankings again with B nats added to every fallback (added)
   item's fused score, a sweep on the test queries themselves (a diagnostic of the trade between the two
   query sets, not a fitted operating point), with the item-weighted mean of both sets per boost.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ace.config import load_config  # noqa: E402
from ace.metrics import retrieval_metrics  # noqa: E402
from ace.newitems.hybrid import untrained_completion as committed_rule  # noqa: E402  (before any patching below)
from ace.pipeline.run_config import RunConfig  # noqa: E402
from ace.pipeline.stages import load_source_corpus, split_captions  # noqa: E402
from ace.run_folder import RunPaths, copy_trained_run, read_encoder_config, read_pairs  # noqa: E402


def added_run(captions: str, cfg: RunConfig, work: Path, *, hold_out_last: bool = False) -> list[list[str]]:
    """``work`` = the trained run + every other item of ``captions`` added; the added items' test pairs. With
    ``hold_out_last`` each item is added without its last generated query, and those queries are the pairs
    returned (validation queries no item vector has seen)."""
    from ace.data.encoders import build_encoder
    from ace.serving.retriever import Retriever

    pairs_file = work / ("added_validation_queries.json" if hold_out_last else "added_test_queries.json")
    if pairs_file.is_file():
        return json.loads(pairs_file.read_text())
    copy_trained_run(ROOT / cfg.run_dir, work)
    full = load_source_corpus(dataclasses.replace(cfg.corpus, path=captions, limit=None))
    items, test = split_captions(type(full)(items=full.items[cfg.corpus.limit:], root=full.root, source=full.source),
                                 cfg.split)
    items = [dataclasses.replace(it, embedding=None) for it in items.items]
    if hold_out_last:
        if any(len(it.captions) < 2 for it in items):
            sys.exit("--fit-boost: every added item needs a generated query besides its document to hold out")
        test = [(it.captions[-1], it.item_id) for it in items]
        items = [dataclasses.replace(it, captions=it.captions[:-1]) for it in items]
    r = Retriever.from_run(work, device="cpu")
    emb = build_encoder(read_encoder_config(work)).encode(items)
    r.add_items([dataclasses.replace(it, embedding=e, media=None) for it, e in zip(items, emb)])
    r.close()
    pairs_file.write_text(json.dumps([list(p) for p in test]))
    return [list(p) for p in test]


@torch.inference_mode()
def gold_level_logprobs(r, pairs) -> np.ndarray:
    """(Q, levels) teacher-forced log P of each level of each query's gold identifier prefix."""
    from ace.model.decoding import constrained_beam_search, score_identifiers

    model, qtok, vocab = r.model.eval(), r.query_tokenizer, r.vocab
    codes = dict(zip(r.id_tokenizer.trie.item_ids, np.asarray(r.id_tokenizer.trie.codes)))
    out = []
    for s in range(0, len(pairs), 100):
        batch = pairs[s:s + 100]
        e = qtok([q for q, _ in batch], max_length=model.config.max_query_length)
        st: dict = {}
        constrained_beam_search(model, e.input_ids, e.attention_mask, r.trie(), vocab, num_beams=1, top_k=1, state=st)
        toks = torch.as_tensor(vocab.encode(np.stack([codes[g] for _, g in batch])), dtype=torch.long)[:, None, :]
        out.append(score_identifiers(model, st["memory"], st["mask"], toks, vocab.length - 1, query=st["query"],
                                     per_level=True)[:, 0].numpy())
    return np.concatenate(out)


def mean_rule(level_logprob, depth, generative_logprob, generative_rows):
    """The alternative rule: untrained levels at the query's mean per-level log-prob of its candidates."""
    levels = level_logprob.shape[-1]
    valid = np.asarray(generative_rows) >= 0
    n = valid.sum(1)
    mean = np.where(n > 0, np.where(valid, generative_logprob, 0.0).sum(1) / np.maximum(n, 1) / levels, 0.0)
    known = np.arange(levels) < np.asarray(depth)[..., None]
    return np.where(known, level_logprob, mean[:, None, None]).sum(-1)


# rule name -> (hybrid.added_levels, the completion of the levels it leaves untrained, hybrid.added_neighbour);
# only "mean" is patched in
RULES = {"best (committed)": ("trained", committed_rule, 0.0), "mean": ("trained", mean_rule, 0.0),
         "no trained level": ("none", committed_rule, 0.0)}
RULES["signature"] = ("signature", committed_rule, 0.0)
RULES |= {f"neighbour {lam:g}": ("none", committed_rule, lam) for lam in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)}


def use_rule(retriever, rule: str) -> None:
    """Make ``retriever``'s merged search score added items by ``rule`` (this process only)."""
    import ace.newitems.hybrid as hybrid

    scorer = retriever.hybrid.scorer
    scorer.added_levels, hybrid.untrained_completion, scorer.added_neighbour = RULES[rule]


def recall(hits, pairs) -> dict:
    """R@1 / R@10 of search hits against (query, gold id) pairs."""
    m = retrieval_metrics([[h.item_id for h in row] for row in hits], [g for _, g in pairs])
    return {k: round(m[k], 1) for k in ("R@1", "R@10", "queries")}


def boosted(hits, boost: float, k: int = 10) -> list[list[str]]:
    """Top-k item ids of each query's merged hits with ``boost`` added to the fallback (added) items' scores."""
    return [[h.item_id for h in sorted(row, key=lambda h: -(h.score + (boost if h.source == "fallback" else 0.0)))[:k]]
            for row in hits]


def boost_sweep(hits: dict, pairs: dict, weights: dict, boosts: list[float]) -> list[dict]:
    """One row per boost: R@1 / R@10 of each query set (``hits`` / ``pairs`` keyed "old", "added") and their mean
    weighted by ``weights`` (items per set: each item has the same number of test queries)."""
    rows = []
    for b in boosts:
        row: dict = {"boost": float(b)}
        for name in ("old", "added"):
            m = retrieval_metrics(boosted(hits[name], b), [g for _, g in pairs[name]])
            row[name] = {k: round(m[k], 2) for k in ("R@1", "R@10")}
        total = sum(weights.values())
        row["items_weighted"] = {k: round(sum(weights[n] * row[n][k] for n in weights) / total, 2) for k in ("R@1", "R@10")}
        rows.append(row)
    return rows


def fit_boost(rows_val: list[dict], bars: dict) -> dict:
    """The boost of a validation sweep (``boost_sweep`` rows) with the largest margin min(old R@10 - generative alone,
    added R@10 - fallback alone) over the bars ``{"old": R@10, "added": R@10}``; ties to the boost nearest 0."""
    def margin(row):
        return min(row["old"]["R@10"] - bars["old"], row["added"]["R@10"] - bars["added"])
    best = max(rows_val, key=lambda row: (round(margin(row), 9), -abs(row["boost"])))
    return {"boost": best["boost"], "margin": round(margin(best), 2), "bars": bars}


def dt_on(captions: str, ids: set) -> dict:
    """DT document+queries (the quality bench's baseline) over every item, on the test queries of ``ids``."""
    from ace.bench.baselines import dt_doc_plus_queries, encode_split, query_targets
    from ace.data.encoders import MINILM, TextEncoder
    from ace.data.importers import load_proxy_split

    split = load_proxy_split(captions)
    rankings = dt_doc_plus_queries(split, encode_split(split, TextEncoder(MINILM), encoder_name=MINILM))
    rows = [j for j, t in enumerate(query_targets(split)) if t in ids]
    m = retrieval_metrics([rankings[j] for j in rows], [query_targets(split)[j] for j in rows])
    return {k: round(m[k], 1) for k in ("R@1", "R@10", "queries")}


def fit_on_validation(args, cfg: RunConfig, work: Path, weights: dict) -> dict:
    """Per rule, ``fit_boost`` on validation: a copy of the trained run with the items added without their last
    generated query and the trained items' vectors without their held-out scorer query (the hybrid stage's fit
    set); old items' queries = those scorer queries, added items' = the queries held out. Each side's gold
    vector lacks one text, as alike as the two sides can be made."""
    from ace.serving.retriever import Retriever

    from ace.pipeline.hybrid_stage import item_vector_sets

    work_val = work.parent / f"{work.name}_validation"
    pairs = {"added": added_run(args.captions, cfg, work_val, hold_out_last=True),
             "old": read_pairs(RunPaths(work_val).scorer_queries)}
    r = Retriever.from_run(work_val, device="cpu")
    # the trained items' stored vectors include the scorer queries (the serving set): here they are the fit set,
    # without them, so neither side's validation queries are in their gold item's vector
    fit_set, _ = item_vector_sets(r, work_val, cfg.hybrid, pairs["old"], seed=cfg.seed, ids=r.hybrid.scorer.vectors.ids)
    fit_set.save(work_val / RunPaths.HYBRID)
    r.close()
    r = Retriever.from_run(work_val, device="cpu")
    bars = {"old": recall(r.search_generative([q for q, _ in pairs["old"]], k=10, num_beams=args.beams),
                          pairs["old"])["R@10"],
            "added": recall(r.search([q for q, _ in pairs["added"]], k=10, mode="fallback"), pairs["added"])["R@10"]}
    out = {}
    for rule in args.rules:
        use_rule(r, rule)
        hits = {name: r.search([q for q, _ in p], k=64, num_beams=args.beams) for name, p in pairs.items()}
        rows = boost_sweep(hits, pairs, weights, args.boosts)
        out[rule] = fit_boost(rows, bars) | {"validation_queries": {n: len(p) for n, p in pairs.items()},
                                             "validation_sweep": rows}
    use_rule(r, "best (committed)")
    r.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("captions")
    ap.add_argument("--config", default="configs/flickr30k_80_20_hybrid.yaml")
    ap.add_argument("--work", default="benchmarks/out/merged_probe/work")
    ap.add_argument("--old-queries", type=int, default=400, help="the first N of the old items' test queries")
    ap.add_argument("--beams", type=int, default=50)
    ap.add_argument("--rules", nargs="+", default=["best (committed)", "mean"],
                    choices=list(RULES), help="untrained-level rules to measure")
    ap.add_argument("--boosts", nargs="*", type=float, default=[],
                    help="nats added to added items' fused scores: a sweep on the test queries (needs beams + dense + "
                         "fallback candidates <= 64)")
    ap.add_argument("--fit-boost", action="store_true",
                    help="fit the boost on validation (a second copy with each added item's last generated query held "
                         "out: those queries and the run's held-out scorer queries) and report test at it")
    ap.add_argument("--skip-dt", action="store_true", help="no DT document+queries figure (part 3)")
    ap.add_argument("--skip-logprobs", action="store_true", help="no per-level gold log-probs (part 1)")
    args = ap.parse_args(argv)

    from ace.serving.retriever import Retriever

    cfg = load_config(RunConfig, ROOT / args.config, [f"corpus.path={args.captions}"])
    work = ROOT / args.work
    new = added_run(args.captions, cfg, work)
    old = read_pairs(RunPaths(work).test_queries)[:args.old_queries]
    r = Retriever.from_run(work, device="cpu")
    tok = r.id_tokenizer
    trained = set(json.loads((work / RunPaths.ITEM_IDS).read_text()))
    codes = dict(zip(tok.trie.item_ids, np.asarray(tok.trie.codes)))
    old_codes = np.stack([codes[i] for i in trained])
    result: dict = {"gold_level_logprob": {}, "merged": {}}
    for name, pairs in (() if args.skip_logprobs else (("added", new), ("old", old))):
        result["gold_level_logprob"][name] = gold_level_logprobs(r, pairs).mean(0).round(2).tolist()
    gold_new = [codes[g] for _, g in new]
    result["added_prefix_shared_with_trained"] = {
        f"levels 1-{d}": float(np.mean([any((c[:d] == old_codes[:, :d]).all(1)) for c in gold_new])) for d in (1, 2, 3)}

    # each path alone on its own items, at the same beams: the bar merged search must not fall below
    result["alone"] = {"generative, old items": recall(r.search_generative([q for q, _ in old], k=10,
                                                                          num_beams=args.beams), old),
                       "fallback, added items": recall(r.search([q for q, _ in new], k=10, mode="fallback"), new)}
    pairs_of = {"added": new, "old": old}
    weights = {"old": len(trained), "added": len({g for _, g in new})}   # items per set, for the weighted mean
    for rule in args.rules:
        use_rule(r, rule)
        hits = {name: r.search([q for q, _ in pairs], k=64 if args.boosts else 10, num_beams=args.beams)
                for name, pairs in pairs_of.items()}
        for name, pairs in pairs_of.items():   # the first 10 of 64 are the 10 a k=10 search returns
            result["merged"][f"{rule}, {name} items"] = recall([row[:10] for row in hits[name]], pairs)
        if args.boosts:
            result.setdefault("boost_sweep", {})[rule] = boost_sweep(hits, pairs_of, weights, args.boosts)
    use_rule(r, "best (committed)")
    r.close()
    if args.fit_boost and args.boosts:
        result["boost_fit"] = fit_on_validation(args, cfg, work, weights)
        for rule, fit in result["boost_fit"].items():
            fit["test"] = next(row for row in result["boost_sweep"][rule] if row["boost"] == fit["boost"])
    if not args.skip_dt:
        result["dt_doc_plus_queries_all_items_added_queries"] = dt_on(args.captions, {g for _, g in new})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
