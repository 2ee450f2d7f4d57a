"""What ``train.py fold`` measures and reports (ace/pipeline/fold.py): held-out test recall through the
run as served (before / after), the gate's validation recall (before through the served run, after on
the fine-tuned model in memory) and the Markdown report."""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ace.newitems.hybrid import read_offsets
from ace.pipeline import fold_gate
from ace.run_folder import RunPaths, write_json_atomic


def _rankings(search, pairs, k: int, num_beams: int, batch_size: int) -> list[list[str]]:
    if not pairs:
        return []
    hits = search([q for q, _ in pairs], k=k, num_beams=num_beams, batch_size=batch_size)
    return [[h.item_id for h in row] for row in hits]


def _recall(search, pairs: list[tuple[str, str]], k: int, num_beams: int, batch_size: int) -> dict | None:
    """retrieval_metrics of one search path on (query, item_id) pairs; None when there are none."""
    return fold_gate.metrics(_rankings(search, pairs, k, num_beams, batch_size), pairs)


def evaluate_paths(run: Path, old_pairs, new_pairs, cfg, device: str, *, folded: list[str] | None) -> dict:
    """Held-out recall through the run as served. Before the fold (``folded=None``): old items on the
    generative path and merged search, the new ones through the fallback (``new_fallback_rankings``
    kept, to compare subsets later) and merged search (rankings kept too). After it: folded items through the
    generative path and merged search, items that stayed through the fallback, all new items through merged search."""
    from ace.serving.retriever import Retriever

    retriever = Retriever.from_run(run, device=device)
    kw = dict(k=cfg.top_k, num_beams=cfg.num_beams, batch_size=cfg.eval_batch_size)

    def fallback(queries, k, num_beams, batch_size):
        return retriever.search_fallback(queries, k=k)

    try:
        out = {"old_generative": _recall(retriever.search_generative, old_pairs, **kw),
               "old_merged": _recall(retriever.search, old_pairs, **kw)}
        merged = _rankings(retriever.search, new_pairs, **kw)
        out["new_merged"] = fold_gate.metrics(merged, new_pairs)
        if folded is None:
            out["new_merged_rankings"] = merged
            rankings = _rankings(fallback, new_pairs, **kw) if retriever.fallback is not None else []
            out["new_fallback"] = fold_gate.metrics(rankings, new_pairs) if rankings else None
            out["new_fallback_rankings"] = rankings
        else:
            mine = set(folded)
            out["new_generative"] = _recall(retriever.search_generative, [p for p in new_pairs if p[1] in mine], **kw)
            sub = [(r, p) for r, p in zip(merged, new_pairs) if p[1] in mine]
            out["folded_merged"] = fold_gate.metrics([r for r, _ in sub], [p for _, p in sub]) if sub else None
            stayed = [p for p in new_pairs if p[1] not in mine]
            out["stayed_fallback"] = _recall(fallback, stayed, **kw) if retriever.fallback is not None else None
        return out
    finally:
        retriever.close()


def search_rows(run: Path, cfg, model, tok, rows: list[int], pairs) -> list[list[str]]:
    """Generative rankings (item ids) of ``pairs`` by ``model`` over the identifiers ``rows`` of ``tok``."""
    from ace.model.decoding import search_texts
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from identifiers import FlatTrie

    if not pairs:
        return []
    paths = RunPaths(run)
    trie = FlatTrie.from_codes(tok.codes[rows], tok.level_sizes, items=np.asarray(rows, dtype=np.int64))
    idx, _, _ = search_texts(model, QueryTokenizer.load(paths.query_tokenizer), [q for q, _ in pairs], trie,
                             IdentifierVocab.load(paths.identifier_vocab), num_beams=cfg.num_beams, top_k=cfg.top_k,
                             batch_size=cfg.eval_batch_size)
    return [[tok.item_ids[i] for i in row if i >= 0] for row in np.asarray(idx).tolist()]


def gate_k(cfg) -> int:
    """The gate's recall cut-off: ``gate_k``, else ``top_k``."""
    return cfg.gate_k if cfg.gate_k is not None else cfg.top_k


def gate_scorer(run: Path, cfg):
    """The run's HybridScorer when the gate measures the path as served and the run serves hybrid
    (RUN/hybrid); None: the gate measures the generative path (beam search alone)."""
    from ace.newitems.hybrid import HybridScorer

    if cfg.gate_path == "generative" or not RunPaths(run).hybrid_scorer.is_file():
        return None
    return HybridScorer.load(run)


def _strip(item, held: set[str]):
    """``item`` without the texts in ``held`` (captions, and a metadata text that is one of them)."""
    meta = {k: v for k, v in (item.metadata or {}).items() if not (k == "text" and v in held)}
    return dataclasses.replace(item, captions=[c for c in item.captions if c not in held], metadata=meta)


class GateView:
    """What the gate scores a hybrid run with: the run's fitted scorer, with every validation query kept out
    of the item vectors it is scored against (an item vector averages the item's texts, and the caption
    proxy's training queries are its captions: a held-out query inside its own item's vector is found by
    the cosine alone, which hides both forgetting and a weak generative path). Old items with validation
    queries get vectors rebuilt from their description and training queries minus those and the queries
    derived from them (``hybrid_stage.training_queries``, the rule of the hybrid fit's vectors); added items
    (``items_of``: id -> CorpusItem from the store) lose theirs from their captions."""

    def __init__(self, run: Path, scorer, split: dict, items_of):
        from ace.data.corpus import CorpusItem
        from ace.pipeline.hybrid_stage import training_queries
        from ace.run_folder import load_run_corpus

        pairs = list(split["val_old"]) + list(split["val_new"])
        held: dict[str, set[str]] = defaultdict(set)
        for q, iid in pairs:
            held[iid].add(q)
        self.held, self._items_of = held, items_of
        old = {iid for iid in held if iid in scorer.vectors.row}
        _, kept = training_queries(run, pairs) if old else ({}, {})   # the hybrid fit's rule for its own vectors
        self.old_items = {}
        for it in load_run_corpus(run, RunPaths.CORPUS_TRAIN).items:
            if it.item_id in old:
                texts = [t for t in dict.fromkeys([it.description() or "", *kept.get(it.item_id, [])])
                         if t and t not in held[it.item_id]]
                self.old_items[it.item_id] = CorpusItem(it.item_id, it.modality, captions=texts)
        vectors = copy.copy(scorer.vectors)
        vectors.row = {iid: r for iid, r in scorer.vectors.row.items() if iid not in self.old_items}
        self.scorer = dataclasses.replace(scorer, vectors=vectors)

    def items_of(self, ids: list[str]) -> list:
        """CorpusItems of ``ids`` (items without a stored vector here) without their validation queries."""
        store_ids = [i for i in ids if i not in self.old_items]
        stored = dict(zip(store_ids, self._items_of(store_ids))) if store_ids else {}
        return [self.old_items[i] if i in self.old_items else _strip(stored[i], self.held.get(i, set())) for i in ids]


def hybrid_rows(run: Path, cfg, model, tok, rows: list[int], pairs, view: GateView,
                fallback: list[str] = (), offsets: dict[str, float] | None = None) -> list[list[str]]:
    """Hybrid rankings (identifier log-prob + w * cosine, the run's fitted scorer) of ``pairs`` by ``model``:
    the identifiers ``rows`` of ``tok`` on the generative path, the items ``fallback`` (ids in ``tok``) served
    outside it as merged search serves added items; item vectors from ``view`` (no validation query in them);
    ``offsets``: the folded items' log-prob offsets (as served, ``read_offsets``)."""
    return [[iid for iid, _ in row[:cfg.top_k]]
            for row in hybrid_scored(run, cfg, model, tok, rows, pairs, view, fallback, offsets)]


def hybrid_scored(run: Path, cfg, model, tok, rows: list[int], pairs, view: GateView, fallback: list[str] = (),
                  offsets: dict[str, float] | None = None) -> list[list[tuple[str, float]]]:
    """``hybrid_rows``' every candidate with its fused score, best first: [(item_id, score), ...] per query."""
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from ace.newitems.hybrid import HybridIndex
    from identifiers import FlatTrie

    if not pairs:
        return []
    paths = RunPaths(run)
    vocab = IdentifierVocab.load(paths.identifier_vocab)
    trie = FlatTrie.from_codes(tok.codes[rows], tok.level_sizes, items=np.asarray(rows, dtype=np.int64)) if rows else None
    index = HybridIndex(view.scorer, model, QueryTokenizer.load(paths.query_tokenizer), offsets=offsets)
    later = view.items_of([tok.item_ids[r] for r in rows if tok.item_ids[r] not in view.scorer.vectors.row])
    pos = {iid: r for r, iid in enumerate(tok.item_ids)}
    fb_items = view.items_of(list(fallback))
    tokens = (vocab.encode(np.stack([np.asarray(tok.codes[pos[i]]) for i in fallback])) if len(fallback)
              else np.zeros((0, 1), dtype=np.int64))
    beams = max(cfg.num_beams, cfg.top_k)
    every = beams + view.scorer.dense_candidates + len(fallback)    # no candidate is cut
    hits = index.search([q for q, _ in pairs], every, beams, trie=trie,
                        table_ids=list(tok.item_ids), vocab=vocab, later_items=later + fb_items,
                        fallback_items=fb_items, fallback_tokens=tokens, batch_size=cfg.eval_batch_size,
                        table_codes=np.asarray(tok.codes))
    return [[(h.item_id, h.score) for h in row] for row in hits]


def gate_before(run: Path, fold_dir: Path, cfg, device: str, split: dict, tok, old_rows: list[int], items: list[str],
                items_of) -> dict:
    """Validation recall before the fold (cached in fold_dir/gate_before.json). Generative run (or
    ``gate_path=generative``): old items on the generative path, new items through the fallback alone.
    Hybrid run, with no validation query in any item vector (``GateView``): old items on the generative path
    re-scored by the fused score; new items as served, merged search with the candidates ``items`` in the
    fallback (the gate's bar; the fallback alone is reported beside it). ``old_bar=unshared`` (what ``auto``
    resolves to on a run without a hybrid scorer): old items over the old items alone, which charges the fold
    with the adds' own crowding (on mscoco 80/20 test, old items gained 0.6-1.7 R@10 from forced folds the gate
    measured as -1.8 / -2.2). ``old_bar=served`` (``auto`` on a hybrid run): merged search with the candidates
    in the fallback, as served. Held-out training queries belong to items
    with one training query fewer, which the fallback's items crowd out more than test queries' items: with an
    earlier model that looked like +4 R@10 on validation while held-out test lost 2.8; on the session-14 runs
    validation read 0-1.5 points above test."""
    path = fold_dir / "gate_before.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        # a file of an earlier version (no per-query hits) or of another old_bar: measure again
        if "old_hits" in cached and cached.get("old_bar", "unshared") == cfg.old_bar:
            return cached
    from ace.model.modeling import AceModel
    from ace.serving.retriever import Retriever

    scorer = gate_scorer(run, cfg)
    if cfg.old_bar == "served" and scorer is None:
        raise ValueError(f"old_bar=served needs a hybrid run (RUN/hybrid/scorer.json); {run} has none: use old_bar=unshared")
    k = gate_k(cfg)
    r = Retriever.from_run(run, device=device)
    kw = dict(k=cfg.top_k, num_beams=cfg.num_beams, batch_size=cfg.eval_batch_size)
    try:
        alone = ([] if r.fallback is None else
                 _rankings(lambda q, k, num_beams, batch_size: r.search_fallback(q, k=k), split["val_new"], **kw))
        if scorer is None:
            old, bar = _rankings(r.search_generative, split["val_old"], **kw), alone
    finally:
        r.close()
    if scorer is not None:
        view = GateView(run, scorer, split, items_of)
        model = AceModel.from_pretrained(str(RunPaths(run).model)).to(device).eval()
        offsets = read_offsets(RunPaths(run).folded_offsets)    # earlier folds' items, as served
        shared = list(items) if cfg.old_bar == "served" else []     # served: the candidates compete from the fallback
        old = hybrid_rows(run, cfg, model, tok, old_rows, split["val_old"], view, fallback=shared, offsets=offsets)
        bar = hybrid_rows(run, cfg, model, tok, old_rows, split["val_new"], view, fallback=list(items), offsets=offsets)
    out = {"path": "hybrid" if scorer is not None else "generative", "old_bar": cfg.old_bar,
           "old_before": fold_gate.metrics(old, split["val_old"]),
           "new_fallback": fold_gate.metrics(bar, split["val_new"]) if bar else None,
           "new_fallback_alone": fold_gate.metrics(alone, split["val_new"]) if alone else None,
           "fallback_by_item": (fold_gate.per_item_recall(fold_gate.hits(bar, split["val_new"], k), split["val_new"])
                                if bar else {}),
           "old_hits": fold_gate.hits(old, split["val_old"], k),      # per query, for the gate's paired error bars
           "new_hits": fold_gate.hits(bar, split["val_new"], k) if bar else [],
           "fallback_bar": "merged search (as served)" if scorer is not None else "fallback alone"}
    write_json_atomic(path, out)
    return out


def gate_after(run: Path, fold_dir: Path, cfg, device: str, tok, split: dict, old_rows: list[int], items: list[str],
               before: dict, items_of) -> dict:
    """The fine-tuned model (fold_dir/model) on the validation queries, and the gate's decision (gate.json),
    on the path ``before`` measured. Generative path: new items over the old items + every candidate, then
    old items over the old items + the passing candidates. Hybrid-scored (a hybrid run): both over the old
    items + every candidate (the candidates that stay compete from the fallback when served), and with
    ``calibrate`` the candidates' log-prob offset cross-fitted on the validation queries
    (``fold_gate.cross_fit_offset``: each half ranked with the offset fitted on the other half); the offset
    fitted on all of them is recorded (``calibration``) for the staged model."""
    from ace.model.modeling import AceModel

    model = AceModel.from_pretrained(str(fold_dir / RunPaths.MODEL)).to(device).eval()
    hybrid = before.get("path") == "hybrid"
    view = GateView(run, gate_scorer(run, cfg), split, items_of) if hybrid else None
    row = {iid: i for i, iid in enumerate(tok.item_ids)}
    k = gate_k(cfg)
    args = dict(k=k, max_old_drop=cfg.max_old_drop, enabled=cfg.gate)
    calibration = None
    if hybrid:
        offsets = read_offsets(RunPaths(run).folded_offsets)    # earlier folds' items, as served
        every = old_rows + [row[i] for i in items]
        new_scored, old_scored = (hybrid_scored(run, cfg, model, tok, every, split[name], view, offsets=offsets)
                                  for name in ("val_new", "val_old"))
        grid = cfg.offset_grid if cfg.calibrate else [0.0]
        old_rank, new_rank, calibration = fold_gate.cross_fit_offset(
            grid, set(items), (before["old_hits"], old_scored, split["val_old"]),
            (before["new_hits"], new_scored, split["val_new"]), k=k, max_old_drop=cfg.max_old_drop,
            max_new_drop=cfg.max_new_drop, z=cfg.gate_z, depth=cfg.top_k)
        generative = fold_gate.per_item_recall(fold_gate.hits(new_rank, split["val_new"], k), split["val_new"])
    else:
        new_rank = search_rows(run, cfg, model, tok, old_rows + [row[i] for i in items], split["val_new"])
        generative = fold_gate.per_item_recall(fold_gate.hits(new_rank, split["val_new"], k), split["val_new"])
        first = fold_gate.gate(items, generative, before["fallback_by_item"], before["old_before"], None, **args)
        passing = [i for i in items if first["items"][i]["fold"]]
        old_rank = search_rows(run, cfg, model, tok, old_rows + [row[i] for i in passing], split["val_old"])
    old_after = fold_gate.metrics(old_rank, split["val_old"])
    new_after = fold_gate.metrics(new_rank, split["val_new"])
    old_hits = (before["old_hits"], fold_gate.hits(old_rank, split["val_old"], k)) if split["val_old"] else None
    new_hits = (before["new_hits"], fold_gate.hits(new_rank, split["val_new"], k)) if before["new_hits"] else None
    decision = fold_gate.gate(items, generative, before["fallback_by_item"], before["old_before"], old_after, **args,
                              new_before=before["new_fallback"], new_after=new_after, max_new_drop=cfg.max_new_drop,
                              old_hits=old_hits, new_hits=new_hits, z=cfg.gate_z)
    decision.update(old_before=before["old_before"], old_after=old_after, new_fallback=before["new_fallback"],
                    new_generative=new_after, val_old_source=split["val_old_source"],
                    path=before.get("path", "generative"), fallback_bar=before.get("fallback_bar", "fallback alone"),
                    old_bar=before.get("old_bar", "unshared"),
                    new_fallback_alone=before.get("new_fallback_alone"), calibration=calibration)
    write_json_atomic(fold_dir / "gate.json", decision)
    return decision


def format_report(m: dict) -> str:
    """Markdown report of one fold: the gate's decision, then held-out test recall of each path before and after."""
    rows = [("old items, generative path", "old_generative", "old_generative"),
            ("old items, merged search", "old_merged", "old_merged"),
            ("folded items: fallback before, generative after", "folded_fallback", "new_generative"),
            ("folded items, merged search (as served)", "folded_merged", "folded_merged"),
            ("new items: fallback before / those that stayed after", "new_fallback", "stayed_fallback"),
            ("all new items, merged search", "new_merged", "new_merged")]

    def cell(d, key):
        r = d.get(key)
        return "-" if r is None else f"{r['R@1']:.1f} / {r['R@10']:.1f} ({r['queries']} q)"

    cost = m.get("cost") or {}
    lines = [f"# Fold {m['fold']}", "",
             f"{m['candidates']} candidate items: {m['new_pairs']} new pairs (+ {m.get('val_pairs') or 0} held out "
             f"for the gate) + {m['replay_pairs']} replayed old pairs ({(m.get('replay_info') or {}).get('kind', '-')}), "
             f"{m['steps']} fine-tuning steps ({(m['train_seconds'] or 0):.0f} s), distill_weight "
             f"{m['config']['distill_weight']}, frozen encoder: {m.get('frozen_encoder')}; started from model "
             f"{m.get('base_model')}.", "",
             f"**{m['items']} folded, {len(m['stayed'])} stayed in the fallback.**", "",
             fold_gate.format_gate_report(m["gate"], cost),
             "## Held-out test queries", "",
             "| R@1 / R@10 | before | after |", "| --- | --- | --- |"]
    for label, b, a in rows:
        lines.append(f"| {label} | {cell(m['before'], b)} | {cell(m['after'], a)} |")
    lines += ["", "Before the fold the new items are in the fallback index (the generative path cannot return them); "
              "after it the folded ones are in the generative path and leave the fallback, the others stay in it. "
              "Old-item recall before vs after measures forgetting. Running servers reload the new model (serve config store.reload_model).", ""]
    return "\n".join(lines)
