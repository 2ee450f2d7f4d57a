"""Items added and deleted after training: fallback stage, Retriever.add_items/delete_items, POST/DELETE /items,
the items CLI, durability under SIGKILL and identifier stability, on a tiny run trained once per session."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ace.config import ServeConfig, load_config
from ace.data.corpus import CorpusItem
from ace.serving.retriever import ItemConflictError, ItemNotFoundError, Retriever, RetrieverError, WriterLockError
from ace.serving.server import create_app
from ace.serving.store import ItemStore
from tests.conftest import ROOT
from tests.serving_support import free_port, png_bytes, running_server, stream_until_killed, wav_bytes

sys.path.insert(0, str(ROOT / "benchmarks"))
from load_test import _wait_healthy  # noqa: E402  (benchmarks/load_test.py: polls /health, fails if the process exits)

KEY = {"X-API-Key": "k3y"}
DIM = 24


def load(run: Path, text_encoder) -> Retriever:
    return Retriever.from_run(run, device="cpu", text_encoder=text_encoder)


def query_item(r: Retriever, item_id: str, query: str, **kw) -> CorpusItem:
    """An item whose embedding is exactly where the fallback's query tower puts ``query``."""
    return CorpusItem(item_id, "image", embedding=r.fallback.tower.encode([query])[0], captions=[query], **kw)


def ids(hits) -> list[str]:
    return [h.item_id for h in hits]


def all_trained_codes(r: Retriever) -> dict[str, tuple]:
    return {i: tuple(c) for i, c in zip(r.corpus.item_ids, r.id_tokenizer.codes_of(r.corpus.item_ids).tolist())}


# ---------------------------------------------------------------------------------- fallback stage
def test_fallback_stage_writes_an_empty_index_and_calibration(base_run, capsys):
    fb = base_run / "fallback"
    for name in ("calibration.json", "summary.json", "ids.json", "tower/meta.json", "hash/hash_head.json", "index/meta.json"):
        assert (fb / name).is_file(), name
    summary = json.loads((fb / "summary.json").read_text())
    assert summary["tower"] == "projected" and summary["bits"] == 64 and summary["calibration_queries"] == 36
    cal = summary["calibration"]
    assert cal["generative"]["a"] > 0 and cal["fallback"]["a"] > 0 and cal["scale"] == "cosine"
    # the trained query tower finds held-out training queries' items among all 36 trained items
    assert summary["held_out_recall"]["fallback_over_trained_items"]["R@10"] > 50
    assert json.loads((fb / "ids.json").read_text())["id_of"] == {}
    marker = json.loads((base_run / "stages" / "fallback.json").read_text())
    assert marker["key"] and "summary" in marker
    from ace.pipeline.run_config import RunConfig  # a re-run skips the stage (same config hash)
    from ace.pipeline.stages import Pipeline

    capsys.readouterr()
    Pipeline(load_config(RunConfig, base_run / "config.yaml"), progress=False).run_all(until="fallback")
    assert "[fallback] up to date" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- library
def test_merged_search_scores_both_sources_by_the_tower_cosine(run, text_encoder):
    r = load(run, text_encoder)
    assert r.calibration.scale == "cosine"
    r.add_items([query_item(r, "new/violet-kite", "a violet kite in the sky")])
    queries = ["a red car", "a violet kite in the sky"]
    gen = r.search_generative(queries, k=5)
    merged = r.search(queries, k=5)
    qv = r.fallback.tower.encode(queries)
    emb, row = np.load(run / "embeddings.npy"), {i: j for j, i in enumerate(json.loads((run / "item_ids.json").read_text()))}
    for q, g_row, m_row in zip(qv, gen, merged):
        logprob = {h.item_id: h.score for h in g_row}
        for h in m_row:
            if h.source == "generative":  # score = calibrated cosine, raw_score = the beam log-probability
                v = emb[row[h.item_id]]
                cos = float(q @ v / (np.linalg.norm(q) * np.linalg.norm(v)))
                assert h.score == pytest.approx(float(r.calibration.generative(cos)), abs=1e-5)
                assert h.raw_score == pytest.approx(logprob[h.item_id])
        assert all(a.score >= b.score for a, b in zip(m_row, m_row[1:]))
    assert merged[1][0].item_id == "new/violet-kite" and merged[1][0].source == "fallback"
    r.close()


def test_added_items_are_searchable_at_once_and_old_identifiers_stay(run, text_encoder):
    r = load(run, text_encoder)
    before = all_trained_codes(r)
    gen_before = [ids(h) for h in r.search_generative(["a red car", "the dog is blue"], k=5)]
    items = [query_item(r, "new/violet-kite", "a violet kite in the sky"),
             query_item(r, "new/orange-lamp", "an orange lamp on a desk", metadata={"shop": "x"})]
    codes = r.add_items(items)
    assert len(codes) == 2 and all(len(c) == len(r.id_tokenizer.level_sizes) for c in codes)
    assert len(set(map(tuple, r.id_tokenizer.codes.tolist()))) == len(r.id_tokenizer)  # identifiers stay unique
    fb = r.search_fallback(["a violet kite in the sky"], k=2)[0]
    assert fb[0].item_id == "new/violet-kite" and fb[0].source == "fallback" and fb[0].identifier == codes[0]
    merged = r.search(["a violet kite in the sky"], k=5)[0]
    assert "new/violet-kite" in ids(merged)
    hit = next(h for h in merged if h.item_id == "new/violet-kite")
    assert hit.source == "fallback" and 0.0 <= hit.score <= 1.0 and hit.raw_score == pytest.approx(fb[0].score)
    assert {h.source for h in merged} <= {"generative", "fallback"}
    # the generative path is untouched by adds: same results, same identifiers for old items
    assert [ids(h) for h in r.search_generative(["a red car", "the dog is blue"], k=5)] == gen_before
    assert all_trained_codes(r) == before
    assert r.item("new/orange-lamp").metadata == {"shop": "x"}
    assert r.counts() == {"generative": 36, "fallback": 2, "folded": 0, "deleted": 0}
    r.close()
    r2 = load(run, text_encoder)  # restart: rebuilt from store.sqlite
    assert all_trained_codes(r2) == before
    assert tuple(r2.id_tokenizer.codes_of(["new/violet-kite"])[0]) == codes[0]
    assert r2.search_fallback(["a violet kite in the sky"], k=1)[0][0].item_id == "new/violet-kite"
    r2.close()


def test_deleted_items_never_come_back_across_restart(run, text_encoder):
    r = load(run, text_encoder)
    r.add_items([query_item(r, "new/kite", "a violet kite in the sky")])
    trained = r.search_generative(["a red car"], k=1)[0][0].item_id
    before = all_trained_codes(r)
    assert r.delete_items([trained, "new/kite"]) == 2
    everything = [ids(h) for h in r.search(["a red car", "a violet kite in the sky"], k=36, num_beams=40)]
    assert all(trained not in row and "new/kite" not in row for row in everything)
    assert r.search_fallback(["a violet kite in the sky"], k=5) == [[]]
    with pytest.raises(ItemNotFoundError, match="deleted"):
        r.item(trained)
    with pytest.raises(ItemNotFoundError, match="already deleted"):
        r.delete_items([trained])
    with pytest.raises(ItemConflictError, match="never reused"):
        r.add_items([CorpusItem("new/kite", "image", embedding=np.ones(DIM))])
    r.close()
    r2 = load(run, text_encoder)
    assert r2.counts() == {"generative": 35, "fallback": 0, "folded": 0, "deleted": 2}
    rows = [ids(h) for h in r2.search(["a red car", "a violet kite in the sky"], k=36, num_beams=40)]
    assert all(trained not in row and "new/kite" not in row for row in rows)
    assert sum(len(row) for row in rows) > 0
    del before[trained]
    assert {i: c for i, c in all_trained_codes_live(r2).items()} == before
    # a new item after restart never takes the deleted items' identifiers
    deleted_codes = {row.identifier for row in ItemStore(run / "store.sqlite").iterate(status="deleted")}
    (code,) = r2.add_items([CorpusItem("new/other", "image", embedding=r2.fallback.tower.encode(["kite"])[0])])
    assert code not in deleted_codes
    r2.close()


def all_trained_codes_live(r: Retriever) -> dict[str, tuple]:
    live = [i for i in r.corpus.item_ids if i in r.id_tokenizer.trie]
    return {i: tuple(c) for i, c in zip(live, r.id_tokenizer.codes_of(live).tolist())}


def test_folded_items_move_to_the_generative_path_on_restart(run, text_encoder):
    r = load(run, text_encoder)
    (code,) = r.add_items([query_item(r, "new/kite", "a violet kite in the sky")])
    r.close()
    with ItemStore(run / "store.sqlite") as store:  # what `train.py fold` does after retraining
        assert store.mark_folded(["new/kite"]) == 1
    r2 = load(run, text_encoder)
    assert "new/kite" not in r2.fallback and r2.counts()["folded"] == 1
    assert tuple(r2.id_tokenizer.codes_of(["new/kite"])[0]) == code
    rows = r2.trie().leaf_item[r2.trie().leaf_item >= 0]
    assert "new/kite" in {r2.id_tokenizer.item_ids[i] for i in rows}  # decodable by the generative model
    assert r2.item("new/kite").captions == ["a violet kite in the sky"]
    r2.close()


def test_bad_items_get_clear_errors_and_change_nothing(run, text_encoder, tmp_path):
    r = load(run, text_encoder)
    ok = np.ones(DIM, np.float32)
    (tmp_path / "outside.png").write_bytes(png_bytes())
    (tmp_path / "media" / "pic.png").write_bytes(png_bytes())
    cases = [
        ([], "no items"),
        ([CorpusItem("a", "image", embedding=np.full(DIM, np.nan))], "NaN"),
        ([CorpusItem("a", "image", embedding=np.ones(5))], "24-d"),
        ([CorpusItem("a", "image", embedding=np.zeros(DIM))], "all zeros"),
        ([CorpusItem("a", "image", embedding=ok), CorpusItem("a", "image", embedding=ok)], "twice"),
        ([CorpusItem("red-car", "image", embedding=ok)], "already used"),
        ([CorpusItem("a", "sculpture", embedding=ok)], "modality"),
        ([CorpusItem("a", "image")], "embedding or a media file"),
        ([CorpusItem("a", "image", media="missing.png")], "not found"),
        ([CorpusItem("a", "image", media=str(tmp_path / "outside.png"))], "outside the corpus root"),
        ([CorpusItem("a", "image", media="../outside.png")], "outside the corpus root"),
        ([CorpusItem("a", "image", embedding=ok, media="../outside.png")], "outside the corpus root"),
        ([CorpusItem("a", "image", media="pic.png")], "precomputed"),
        ([CorpusItem("a", "image", embedding=ok, metadata={"x": object()})], "JSON"),
    ]
    for items, message in cases:
        with pytest.raises((RetrieverError, ValueError), match=message):
            r.add_items(items)
    for bad, message in ((["nope"], "unknown"), ([], "no item ids"), ("red-car", "list"), (["red-car", "red-car"], "duplicate")):
        with pytest.raises(RetrieverError, match=message):
            r.delete_items(bad)
    assert r.counts() == {"generative": 36, "fallback": 0, "folded": 0, "deleted": 0}
    assert not (run / "store.sqlite").exists() or len(ItemStore(run / "store.sqlite")) == 0
    r.close()


def test_media_items_are_encoded_by_the_runs_encoder(run, text_encoder):
    (run.parent / "media" / "bark.wav").write_bytes(wav_bytes(0.3))
    r = load(run, text_encoder)
    (code,) = r.add_items([CorpusItem("new/bark", "audio", media="bark.wav", captions=["a dog barks"])])
    emb = ItemStore(run / "store.sqlite").get("new/bark").embedding
    assert emb.shape == (DIM,) and np.isfinite(emb).all() and code == tuple(r.id_tokenizer.codes_of(["new/bark"])[0])
    assert r.search_fallback(["a dog barks"], k=1, modality="audio")[0][0].item_id == "new/bark"
    assert r.search_fallback(["a dog barks"], k=1, modality="video") == [[]]
    r.close()


def test_one_writer_per_run_and_the_cli(run, text_encoder, capsys):
    from ace.serving.items import main

    rows = [{"item_id": f"cli/{i}", "modality": "image", "embedding": np.random.default_rng(i).standard_normal(DIM).tolist(),
             "captions": [f"cli item {i}"]} for i in range(3)]
    items_file = run.parent / "items.jsonl"
    items_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["add", "--run", str(run), "--file", str(items_file), "--quiet"]) == 0
    added = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["item_id"] for a in added] == ["cli/0", "cli/1", "cli/2"]
    assert main(["delete", "--run", str(run), "cli/1", "red-car"]) == 0
    assert main(["delete", "--run", str(run), "cli/1"]) == 2
    assert "already deleted" in capsys.readouterr().err
    assert main(["list", "--run", str(run), "--status", "all"]) == 0
    listed = {row["item_id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed["cli/1"]["status"] == "deleted" and listed["red-car"]["source"] == "trained"
    assert listed["cli/0"]["identifier"] == added[0]["identifier"]
    bad = run.parent / "bad.jsonl"
    bad.write_text('{"item_id": "x", "modality": "image", "embedding": [1, 2]}\n{"item_id": 3}\n')
    assert main(["add", "--run", str(run), "--file", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    # writers take turns: each write holds the run's writer lock and first catches up with the others' writes
    r = load(run, text_encoder)
    r.delete_items(["cli/0"])
    assert main(["delete", "--run", str(run), "cli/2"]) == 0
    r2 = load(run, text_encoder)
    (w,) = r2.add_items([CorpusItem("w", "image", embedding=np.ones(DIM))])
    (w2,) = r.add_items([CorpusItem("w2", "image", embedding=np.ones(DIM))])  # one prefix: u tells them apart
    assert w != w2 and r.is_deleted("cli/2") and r.item("w").item_id == "w"
    # a writer that holds the lock for too long: the next one gets a clear error after its wait
    with open(run / "store.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r2.catalog.lock_timeout_s = 0.2
        with pytest.raises(WriterLockError, match="another process"):
            r2.add_items([CorpusItem("w3", "image", embedding=np.ones(DIM))])
    r2.add_items([CorpusItem("w3", "image", embedding=np.ones(DIM))])  # free again
    r.close()
    r2.close()


# ---------------------------------------------------------------------------------- HTTP
def test_http_add_search_delete_and_stats(run, text_encoder):
    r = load(run, text_encoder)
    q = "a violet kite in the sky"
    vec = [float(x) for x in r.fallback.tower.encode([q])[0]]
    app = create_app(r, ServeConfig(api_key="k3y", max_wait_ms=1.0))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        res = c.post("/items", headers=KEY, json={"item_id": "new/kite", "modality": "image", "embedding": vec,
                                                  "captions": [q], "metadata": {"colour": "violet"}})
        assert res.status_code == 201, res.text
        body = res.json()
        assert body["added"] == 1 and body["items"][0]["source"] == "fallback"
        hits = c.post("/search", json={"query": q, "k": 5}).json()["results"]
        kite = next(h for h in hits if h["item_id"] == "new/kite")
        assert kite["source"] == "fallback" and kite["identifier"] == body["items"][0]["identifier"]
        assert kite["captions"] == [q]
        batch = [{"item_id": f"new/b{i}", "modality": "image", "embedding": list(np.random.default_rng(i).standard_normal(DIM))}
                 for i in range(5)]
        res = c.post("/items", headers=KEY, json={"items": batch})
        assert res.status_code == 201 and res.json()["added"] == 5
        assert c.get("/items/new/kite").json()["metadata"] == {"colour": "violet"}
        stats = c.get("/stats").json()
        assert stats["items_by_source"] == {"generative": 36, "fallback": 6, "folded": 0, "deleted": 0}
        assert stats["retriever"]["fallback"]["bits"] == 64
        assert c.delete("/items/new/kite", headers=KEY).json() == {"deleted": "new/kite"}
        assert c.delete("/items/red-car", headers=KEY).status_code == 200
        hits = c.post("/search", json={"query": q, "k": 10}).json()["results"]
        assert not {"new/kite", "red-car"} & {h["item_id"] for h in hits}
        assert c.get("/items/new/kite").status_code == 404
        assert c.get("/stats").json()["items_by_source"]["deleted"] == 2
    r.close()


def test_http_bad_inputs_get_4xx_with_clear_messages(run, text_encoder, tmp_path):
    r = load(run, text_encoder)
    app = create_app(r, ServeConfig(api_key="k3y", max_wait_ms=1.0, max_items_per_request=3))
    good = {"item_id": "ok", "modality": "image", "embedding": [0.1] * DIM}
    (tmp_path / "secret.png").write_bytes(png_bytes())
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/items", json=good).status_code == 401
        assert c.post("/items", json=good, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.delete("/items/red-car").status_code == 401
        cases = [
            (dict(content=b"{not json", headers={**KEY, "content-type": "application/json"}), 400, "malformed JSON"),
            (dict(content=b"", headers=KEY), 422, "request body is required"),
            (dict(json={"modality": "image", "embedding": [0.1] * DIM}), 422, "item_id"),
            (dict(json={**good, "modality": "smell"}), 422, "modality"),
            (dict(json={**good, "colour": "red"}), 422, "colour"),
            (dict(json={**good, "embedding": [0.1] * 5}), 422, "24-d"),
            (dict(content=json.dumps({**good, "embedding": [float("nan")] * DIM}).encode(),
                  headers={**KEY, "content-type": "application/json"}), 422, "NaN"),
            (dict(json={**good, "embedding": ["x"] * DIM}), 422, "embedding"),
            (dict(json={"items": []}), 422, "empty"),
            (dict(json={"items": [good] * 4}), 413, "max_items_per_request"),
            (dict(json={"items": [good, good]}), 409, "twice"),
            (dict(json={**good, "item_id": "red-car"}), 409, "already used"),
            (dict(json={"item_id": "m", "modality": "image", "media": "nothing.png"}), 422, "not found"),
            (dict(json={"item_id": "m", "modality": "image", "media": str(tmp_path / "secret.png")}), 422, "outside"),
            (dict(json={"item_id": "m", "modality": "image"}), 422, "embedding or a media file"),
            (dict(json=[1, 2]), 422, "items.0"),
        ]
        for kwargs, status, message in cases:
            kwargs.setdefault("headers", KEY)
            res = c.post("/items", **kwargs)
            assert res.status_code == status and message in res.json()["detail"], (kwargs, res.status_code, res.text)
        res = c.delete("/items/no-such-item", headers=KEY)
        assert res.status_code == 404 and "unknown" in res.json()["detail"]
        # uploads: an image the run cannot encode (precomputed image encoder) is refused and not kept
        files = {"file": ("p.png", png_bytes(), "image/png")}
        res = c.post("/items", headers=KEY, files=files, data={"item": json.dumps({"item_id": "up", "modality": "image"})})
        assert res.status_code == 422 and "precomputed" in res.json()["detail"]
        assert not (run / "uploads").exists() or list((run / "uploads").iterdir()) == []
        res = c.post("/items", headers=KEY, files=files, data={"item": "{oops"})
        assert res.status_code == 400 and "malformed JSON" in res.json()["detail"]
        res = c.post("/items", headers=KEY, files=files)
        assert res.status_code == 422 and "`item`" in res.json()["detail"]
        res = c.post("/items", headers=KEY, data={"item": json.dumps({"item_id": "up", "modality": "audio"})},
                     files={"other": ("x.wav", b"123")})
        assert res.status_code == 422
        # an audio upload is encoded by the run's audio encoder and served from the corpus root
        res = c.post("/items", headers=KEY, files={"file": ("bark.wav", wav_bytes(0.3), "audio/wav")},
                     data={"item": json.dumps({"item_id": "up/bark", "modality": "audio", "captions": ["a dog barks"]})})
        assert res.status_code == 201, res.text
        assert c.get("/media/up/bark").content == wav_bytes(0.3)
        assert c.get("/health").status_code == 200
        assert c.get("/stats").json()["items_by_source"]["fallback"] == 1
    r.close()


def test_searches_run_safely_alongside_adds_and_deletes(run, text_encoder):
    r = load(run, text_encoder)
    app = create_app(r, ServeConfig(api_key="k3y", max_wait_ms=2.0))
    deleted_at: dict[str, float] = {}
    seen: list[tuple[float, set[str]]] = []
    errors: list[str] = []
    stop = threading.Event()

    def searcher(url, query):
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                res = c.post("/search", json={"query": query, "k": 20})
                if res.status_code != 200:
                    errors.append(res.text)
                else:
                    seen.append((t0, {h["item_id"] for h in res.json()["results"]}))

    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        threads = [threading.Thread(target=searcher, args=(url, q)) for q in ("a red car", "a violet kite", "the dog is blue")]
        for t in threads:
            t.start()
        rng = np.random.default_rng(0)
        for b in range(8):
            batch = [{"item_id": f"c{b}/{j}", "modality": "image", "embedding": list(rng.standard_normal(DIM))} for j in range(10)]
            assert c.post("/items", headers=KEY, json={"items": batch}).status_code == 201
            for victim in (f"c{b}/0", ["red-car", "blue-dog", "green-boat", "white-tree"][b % 4] if b < 4 else f"c{b - 1}/1"):
                assert c.delete(f"/items/{victim}", headers=KEY).status_code == 200
                deleted_at[victim] = time.monotonic()
        after = len(seen) + 3  # let a few searches start after the last delete, however slow the machine
        deadline = time.monotonic() + 60
        while len(seen) < after and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors and len(seen) >= 6
    for t0, found in seen:  # a search that started after a delete was acknowledged never returns the item
        assert not {i for i, t in deleted_at.items() if t < t0} & found
    r.close()


def test_an_item_deleted_between_search_and_response_is_left_out(run, text_encoder):
    r = load(run, text_encoder)
    search = r.search

    def search_then_delete(queries, **kw):  # a DELETE lands right after the beam search
        out = search(queries, **kw)
        r.delete_items([out[0][0].item_id])
        return out

    r.search = search_then_delete
    with running_server(create_app(r, ServeConfig(max_wait_ms=1.0))) as url, httpx.Client(base_url=url, timeout=60) as c:
        res = c.post("/search", json={"query": "a red car", "k": 5})
        assert res.status_code == 200 and len(res.json()["results"]) == 4
        assert not any(r.is_deleted(h["item_id"]) for h in res.json()["results"])
    r.close()


# ---------------------------------------------------------------------------------- durability
def test_sigkill_during_a_stream_of_adds_loses_no_acknowledged_item(run, text_encoder):
    port = free_port()
    killer = threading.Timer(0.5, lambda: None)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACE_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", "max_wait_ms=1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, 180)
        rng = np.random.default_rng(0)
        killer = threading.Timer(0.5, proc.kill)  # SIGKILL
        with httpx.Client(base_url=url, timeout=30) as c:
            acked, sent = stream_until_killed(c, lambda b: [{"item_id": f"s{b}/{j}", "modality": "image",
                                                             "embedding": rng.standard_normal(DIM).tolist()}
                                                            for j in range(20)], killer, headers=KEY)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        assert len(acked) >= 3 and len(sent) > len(acked)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    with ItemStore(run / "store.sqlite") as store:
        assert store.pragma("integrity_check") == "ok"
        rows = list(store.iterate(status=None))
    batches: dict[int, int] = {}
    for row in rows:
        batches[int(row.item_id[1:].split("/")[0])] = batches.get(int(row.item_id[1:].split("/")[0]), 0) + 1
    assert set(acked) <= set(batches) <= set(sent)
    assert set(batches.values()) == {20}  # every stored batch is whole: no half-written batch
    r = load(run, text_encoder)  # restart
    assert r.counts()["fallback"] == 20 * len(batches)
    for b in acked:
        assert all(f"s{b}/{j}" in r.fallback for j in range(20))
    idents = [tuple(row.identifier) for row in rows]
    assert len(set(idents)) == len(idents) and all(tuple(r.id_tokenizer.codes_of([row.item_id])[0]) == tuple(row.identifier)
                                                   for row in rows)
    r.close()


def test_restore_keeps_identifiers_and_their_u_taken():
    from identifiers import IdentifierConfig, SemanticIdTokenizer

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 8)).astype(np.float32)
    cfg = IdentifierConfig(K=2, M=1, codebook_size=2, max_u=64, kmeans_n_init=1, hidden_dims=(8,), latent_dim=4,
                           rqvae_max_steps=5, codebook_kmeans_iters=2)
    tok = SemanticIdTokenizer.fit(emb[:30], [f"t{i}" for i in range(30)], cfg, progress=False)
    fresh = SemanticIdTokenizer.fit(emb[:30], [f"t{i}" for i in range(30)], cfg, progress=False)
    added = tok.assign(emb[30:], [f"a{i}" for i in range(10)])
    fresh.restore(added, [f"a{i}" for i in range(10)])  # what Retriever.from_run does with store identifiers
    assert (fresh.codes_of([f"a{i}" for i in range(10)]) == added).all()
    again = fresh.assign(emb[30:32] + 1e-3, ["b0", "b1"])  # same prefixes: u continues after the restored ones
    assert not {tuple(c) for c in again.tolist()} & {tuple(c) for c in tok.codes.tolist()}
    with pytest.raises(ValueError):
        fresh.restore(added[:1], ["a0"])  # already present
