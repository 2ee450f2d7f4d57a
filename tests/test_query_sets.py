"""Query sets judged by item metadata (ace/pipeline/query_sets.py) and their metric (ace.metrics.relevance_metrics)."""
import json

import pytest

from ace.data.corpus import CorpusItem
from ace.metrics import relevance_metrics
from ace.pipeline.query_sets import QuerySetError, evaluate_query_set, load_query_set, relevant_sets
from ace.pipeline.report import write_report


def test_relevance_metrics_by_hand():
    rankings = [["a", "b"], ["c", "d", "e", "f", "g", "h"], ["x"], []]
    relevant = [{"a"}, {"h", "z"}, {"e", "x"}, {"a"}]
    m = relevance_metrics(rankings, relevant)
    assert m == {"top1": 50.0, "top5": 50.0, "queries": 4}  # query 2's relevant item sits at rank 6
    assert relevance_metrics(rankings, relevant, ks=(10,))["top10"] == 75.0
    with pytest.raises(ValueError, match="2 rankings but 1"):
        relevance_metrics([[], []], [{"a"}])


def write(tmp_path, rows, name="q.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


@pytest.mark.parametrize("line, message", [
    ("{not json", "q.jsonl:2: not JSON"),
    ('["a red square"]', "q.jsonl:2: each line must be a JSON object"),
    ({"query": "", "relevant": {"colour": "red"}}, "q.jsonl:2: 'query' must be a non-empty string"),
    ({"query": "red", "relevant": {}}, "q.jsonl:2: 'relevant' must be a non-empty object"),
    ({"query": "red", "relevant": {"colour": []}}, r"q.jsonl:2: relevant\['colour'\] must be"),
    ({"query": "red", "relevant": {"colour": "red"}, "target": "x"}, r"q.jsonl:2: unknown keys \['target'\]"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    p = write(tmp_path, [{"query": "ok", "relevant": {"colour": "red"}}, line])
    with pytest.raises(QuerySetError, match=message):
        load_query_set(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QuerySetError, match="not found"):
        load_query_set(tmp_path / "nope.jsonl")
    with pytest.raises(QuerySetError, match="has no queries"):
        load_query_set(write(tmp_path, [""]))


ITEMS = [
    CorpusItem("img/rs", "image", captions=["x"], metadata={"colour": "red", "shape": "square"}),
    CorpusItem("vid/rs", "video", captions=["x"], metadata={"colour": "red", "shape": "square", "direction": "up"}),
    CorpusItem("img/bc", "image", captions=["x"], metadata={"colour": "blue", "shape": "circle"}),
    CorpusItem("aud/bell", "audio", captions=["x"], metadata={"sound": "bell"}),
    CorpusItem("aud/drum", "audio", captions=["x"], metadata={"sound": "drum"}),
]


def test_relevance_by_attributes_and_modality(tmp_path):
    p = write(tmp_path, [
        {"query": "a red square", "relevant": {"colour": "red", "shape": "square"}},
        {"query": "square going up", "modality": "video", "relevant": {"shape": "square", "direction": "up"}},
        {"query": "percussion or bells", "modality": "audio", "relevant": {"sound": ["bell", "drum"]}},
    ])
    qs = load_query_set(p)
    assert relevant_sets(qs, ITEMS) == [{"img/rs", "vid/rs"}, {"vid/rs"}, {"aud/bell", "aud/drum"}]
    bad = write(tmp_path, [{"query": "a green star", "relevant": {"colour": "green", "shape": "star"}}], "bad.jsonl")
    with pytest.raises(QuerySetError, match=r"no item in the corpus is relevant to 1 queries: \['a green star'\]"):
        relevant_sets(load_query_set(bad), ITEMS, source=str(bad))


class FixedRetriever:
    """Returns a fixed ranking per query text."""

    def __init__(self, items, answers):
        self.corpus = type("C", (), {"items": items})()
        self.answers = answers
        self.calls = []

    def search(self, queries, k=10, num_beams=None, batch_size=100):
        self.calls.append((list(queries), k, num_beams))
        hit = type("H", (), {})
        out = []
        for q in queries:
            row = []
            for item_id in self.answers[q][:k]:
                h = hit()
                h.item_id = item_id
                row.append(h)
            out.append(row)
        return out


def test_evaluate_query_set_and_report(tmp_path):
    p = write(tmp_path, [
        {"query": "a red square", "relevant": {"colour": "red", "shape": "square"}},
        {"query": "a bell", "modality": "audio", "relevant": {"sound": "bell"}},
        {"query": "blue circle", "modality": "image", "relevant": {"colour": "blue", "shape": "circle"}},
    ], "newcomer.jsonl")
    r = FixedRetriever(ITEMS, {"a red square": ["vid/rs", "img/bc"],
                               "a bell": ["aud/drum", "img/rs", "img/bc", "vid/rs", "aud/bell"],
                               "blue circle": ["aud/bell", "img/rs"]})
    res = evaluate_query_set(r, p, num_beams=7, k=5)
    assert r.calls == [(["a red square", "a bell", "blue circle"], 5, 7)]
    assert res["by_group"]["all"]["top1"] == pytest.approx(100 / 3)
    assert res["by_group"]["all"]["top5"] == pytest.approx(200 / 3)
    assert res["by_group"]["audio"] == {"top1": 0.0, "top5": 100.0, "queries": 1}
    assert res["by_group"]["any modality"]["top1"] == 100.0
    assert [q["first_relevant_rank"] for q in res["queries"]] == [1, 5, None]
    metrics = {"by_group": {"all": {"R@1": 50.0, "R@5": 70.0, "R@10": 80.0, "MRR@10": 60.0, "queries": 4}},
               "headline_beams": 7, "query_sets": {"newcomer": res}}
    text = write_report(tmp_path, title="t", metrics=metrics).read_text()
    assert text.index("Retrieval on held-out queries") < text.index("newcomer.jsonl")
    assert "| all | 33.3 | 66.7 | 3 |" in text
    assert '- "a bell": 5 (aud/drum, img/rs, img/bc)' in text
    assert '- "blue circle": none in the top 2 (aud/bell, img/rs)' in text


def test_reference_table_shows_before_and_after():
    """eval.reference rows beside the run's own figures, a dash where a row has no such figure."""
    from ace.pipeline.report import reference_table

    metrics = {"by_group": {"all": {"R@1": 88.25}},
               "query_sets": {"newcomer": {"by_group": {"all": {"top1": 90.0, "top5": 98.57}}}}}
    text = reference_table({"before": {"held-out R@1": 84.9, "newcomer top-1": 61.4}}, metrics)
    lines = text.splitlines()
    assert lines[0] == "| | held-out R@1 | newcomer top-1 | newcomer top-5 |"
    assert lines[2] == "| before | 84.9 | 61.4 | – |"
    assert lines[3] == "| this run | 88.2 | 90.0 | 98.6 |"


def test_eval_stage_keys_on_the_query_set_files(tmp_path):
    """Editing a query set re-runs the eval stage; a missing one is a clear pipeline error."""
    from ace.pipeline.query_sets import query_set_digest
    from ace.pipeline.stages import Pipeline, PipelineError, RunConfig

    p = write(tmp_path, [{"query": "a red square", "relevant": {"colour": "red"}}])
    before = query_set_digest([p])
    write(tmp_path, [{"query": "a red square", "relevant": {"colour": "red", "shape": "square"}}])
    assert query_set_digest([p]) != before
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.eval.query_sets = [str(tmp_path / "missing.jsonl")]
    pipe = Pipeline(cfg, progress=False)
    pipe.keys["train"] = "k"
    with pytest.raises(PipelineError, match=r"eval.query_sets: query set .*missing.jsonl not found"):
        pipe.stage_eval()


def test_eval_reference_is_not_part_of_the_eval_key(tmp_path, monkeypatch):
    """eval.reference only changes report.md: adding it keeps a run's eval stage up to date; a query set does not."""
    from ace.pipeline.stages import Pipeline, RunConfig

    keys = []

    def key_of(cfg):
        pipe = Pipeline(cfg, progress=False)
        pipe.keys["train"] = "k"
        monkeypatch.setattr(pipe, "_stage", lambda name, key, fn, force=False: keys.append(key))
        pipe.stage_eval()
        return keys[-1]

    p = write(tmp_path, [{"query": "a red square", "relevant": {"colour": "red"}}])
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    plain = key_of(cfg)
    cfg.eval.reference = {"before": {"held-out R@1": 80.0}}
    assert key_of(cfg) == plain
    cfg.eval.query_sets = [str(p)]
    assert key_of(cfg) != plain
