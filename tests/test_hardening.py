"""Issue 18: inputs over HTTP or the CLI that used to brick, poison or hijack a run, each checked through
the server (a real uvicorn on a real tiny run) and again after a restart of it.

1. an item id with a NUL byte; 2. a lone surrogate in a caption; 3. a lone surrogate in a query;
4. a stored script (.html / .svg upload) served by /media; 5. a second writer (the CLI) before the
server's first write, two concurrent uploads of one id, an oversize chunked upload, 500 bodies and
/stats leaking paths; 6. uploads stored in the corpus root (shared by every run of that corpus).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from ace.config import ServeConfig
from ace.data.corpus import CorpusItem
from ace.serving.retriever import Retriever, RetrieverError
from ace.serving.server import create_app
from tests.serving_support import TokenOverlapRetriever, media_corpus, running_server, wav_bytes

KEY = {"X-API-Key": "k3y"}
DIM = 24


def load(run: Path, text_encoder) -> Retriever:
    return Retriever.from_run(run, device="cpu", text_encoder=text_encoder)


@contextlib.contextmanager
def serving(run: Path, text_encoder, **config):
    """The run loaded and served over HTTP; closed (writer lock released) on exit, as a server stop would."""
    r = load(run, text_encoder)
    try:
        app = create_app(r, ServeConfig(api_key="k3y", max_wait_ms=1.0, **config))
        with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
            yield c, r
    finally:
        r.close()


def raw_json(payload: str) -> dict:
    """Request kwargs sending ``payload`` verbatim (JSON escapes such as \\ud800 or \\u0000 reach the server)."""
    return {"content": payload.encode(), "headers": {**KEY, "content-type": "application/json"}}


def vec(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(DIM).tolist()


def healthy(c: httpx.Client) -> None:
    assert c.get("/health").status_code == 200
    res = c.post("/search", json={"query": "a red car", "k": 5})
    assert res.status_code == 200, res.text
    assert len(res.json()["results"]) == 5


# ---------------------------------------------------------------------------------- breaks 1-3
def test_1_nul_in_an_item_id_is_refused_and_deletes_and_restarts_keep_working(run, text_encoder):
    with serving(run, text_encoder) as (c, r):
        res = c.post("/items", **raw_json(json.dumps({"item_id": "a\u0000b", "modality": "image", "embedding": vec(1)})))
        assert res.status_code == 422, res.text
        assert "item_id" in res.json()["detail"] and "U+0000" in res.json()["detail"]
        with pytest.raises(RetrieverError, match="item_id.*U\\+0000"):
            r.add_items([CorpusItem("c\0d", "image", embedding=np.asarray(vec(2)))])
        assert c.post("/items", headers=KEY, json={"item_id": "good/1", "modality": "image",
                                                   "embedding": vec(3)}).status_code == 201
        res = c.delete("/items/good%2F1", headers=KEY)
        assert res.status_code == 200, res.text
        assert r.counts()["fallback"] == 0
    with serving(run, text_encoder) as (c, r):  # restart
        healthy(c)
        assert c.get("/items/good%2F1").status_code == 404
        assert r.counts()["deleted"] == 1


def test_2_lone_surrogate_in_a_caption_or_metadata_is_refused(run, text_encoder):
    with serving(run, text_encoder) as (c, r):
        res = c.post("/items", **raw_json('{"item_id": "s/1", "modality": "image", "embedding": %s, '
                                          '"captions": ["fine", "\\ud800"]}' % json.dumps(vec(1))))
        assert res.status_code == 422, res.text
        assert "captions.1" in res.json()["detail"] and "surrogate" in res.json()["detail"]
        res = c.post("/items", **raw_json('{"items": [{"item_id": "s/2", "modality": "image", "embedding": %s, '
                                          '"metadata": {"t": ["\\udc00"]}}]}' % json.dumps(vec(2))))
        assert res.status_code == 422 and "items.0.metadata.t.0" in res.json()["detail"], res.text
        healthy(c)
        assert c.get("/items/s%2F1").status_code == 404
    with serving(run, text_encoder) as (c, r):
        healthy(c)
        assert r.counts()["fallback"] == 0


def test_3_lone_surrogate_in_a_query_is_a_4xx_naming_the_query(run, text_encoder):
    with serving(run, text_encoder) as (c, r):
        res = c.post("/search", **raw_json('{"query": "a red \\ud800 car"}'))
        assert res.status_code == 422, res.text
        assert "query" in res.json()["detail"] and "surrogate" in res.json()["detail"]
        assert c.post("/search", **raw_json('{"query": "a red \\u0000 car"}')).status_code == 422
        with pytest.raises(RetrieverError, match="surrogate"):
            r.search(["\ud800"], k=3)
        healthy(c)


# ---------------------------------------------------------------------------------- break 4: stored script
def upload(c: httpx.Client, item_id: str, modality: str, name: str, data: bytes, ctype: str = "application/octet-stream"):
    return c.post("/items", headers=KEY, files={"file": (name, data, ctype)},
                  data={"item": json.dumps({"item_id": item_id, "modality": modality, "captions": [f"upload {item_id}"]})})


def test_4_media_responses_never_run_as_pages_in_the_servers_origin(run, text_encoder):
    script = b"<html><script>fetch('/items', {method: 'POST'})</script></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    media = run.parent / "media"
    (media / "page.html").write_bytes(script)
    (media / "pic.svg").write_bytes(svg)
    with serving(run, text_encoder) as (c, r):
        # media paths inside the corpus root: embedding given, so any file type is accepted as an item
        for item_id, path in [("x/html", "page.html"), ("x/svg", "pic.svg")]:
            res = c.post("/items", headers=KEY, json={"item_id": item_id, "modality": "image", "media": path,
                                                      "embedding": vec(len(item_id))})
            assert res.status_code == 201, res.text
        assert upload(c, "x/wav", "audio", "bark.wav", wav_bytes(0.3), "audio/wav").status_code == 201
    with serving(run, text_encoder) as (c, r):  # restart: the same answers
        for item_id, body in [("x/html", script), ("x/svg", svg)]:
            res = c.get(f"/media/{item_id}")
            assert res.status_code == 200 and res.content == body
            assert res.headers["content-type"] == "application/octet-stream"
            assert res.headers["content-disposition"].startswith("attachment")
            assert res.headers["x-content-type-options"] == "nosniff"
            assert "sandbox" in res.headers["content-security-policy"]
        res = c.get("/media/x/wav")
        assert res.status_code == 200 and res.headers["content-type"].startswith("audio/")
        assert "attachment" not in res.headers.get("content-disposition", "")
        assert res.headers["x-content-type-options"] == "nosniff" and "sandbox" in res.headers["content-security-policy"]


def test_4_the_search_page_does_not_keep_the_write_key_in_local_storage():
    from ace.serving.server import STATIC_DIR

    js = "\n".join(p.read_text() for p in STATIC_DIR.glob("*.js"))
    stores = [line for line in js.splitlines() if "localStorage.setItem" in line]
    assert all("remember" in line.lower() or "opt" in line.lower() for line in stores), stores


# ---------------------------------------------------------------------------------- break 5
def test_5_the_cli_writing_before_the_servers_first_write_never_duplicates_identifiers(run, text_encoder, capsys):
    from ace.serving.items import main

    server = load(run, text_encoder)  # a running server, before its own first write
    same = vec(7)                     # one embedding: both items land on one prefix, so only u can tell them apart
    rows = run.parent / "cli.jsonl"
    rows.write_text(json.dumps({"item_id": "cli/x", "modality": "image", "embedding": same}) + "\n")
    assert main(["add", "--run", str(run), "--file", str(rows), "--quiet"]) == 0
    cli_ident = json.loads(capsys.readouterr().out.splitlines()[0])["identifier"]
    (ident,) = server.add_items([CorpusItem("srv/x", "image", embedding=np.asarray(same, dtype=np.float32))])
    assert list(ident) != cli_ident
    assert server.item("cli/x").item_id == "cli/x"  # the server caught up with the CLI's write
    server.close()
    r = load(run, text_encoder)  # restart: both there, identifiers as acknowledged
    assert r.id_tokenizer.codes_of(["cli/x"])[0].tolist() == cli_ident
    assert tuple(r.id_tokenizer.codes_of(["srv/x"])[0]) == tuple(ident)
    r.close()


def test_5_concurrent_uploads_of_one_id_one_wins_and_keeps_its_file(run, text_encoder):
    bodies = [wav_bytes(70.0), wav_bytes(75.0)]  # > 1 MB each: spooled to disk, read in chunks that interleave
    with serving(run, text_encoder) as (c, r):
        barrier = threading.Barrier(2)
        out: list = [None, None]

        def send(n: int) -> None:
            with httpx.Client(base_url=str(c.base_url), timeout=60) as own:
                barrier.wait()
                out[n] = upload(own, "race/1", "audio", "bark.wav", bodies[n], "audio/wav")

        threads = [threading.Thread(target=send, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(res.status_code for res in out)
        assert codes == [201, 409], [res.text for res in out]
        winner = bodies[[res.status_code for res in out].index(201)]
        assert c.get("/media/race/1").content == winner
    with serving(run, text_encoder) as (c, r):
        assert c.get("/media/race/1").content == winner
        assert upload(c, "race/1", "audio", "bark.wav", bodies[0], "audio/wav").status_code == 409
        assert c.get("/media/race/1").content == winner


def test_5_oversize_chunked_upload_is_413(run, text_encoder):
    with serving(run, text_encoder, max_upload_bytes=50_000) as (c, r):
        boundary = "xyzBOUNDARY"

        def body():  # no Content-Length: streamed in chunks
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="item"\r\n\r\n'
                   '{"item_id": "big/1", "modality": "audio"}\r\n'
                   f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                   'Content-Type: audio/wav\r\n\r\n').encode()
            for _ in range(40):
                yield b"\0" * 4096
            yield f"\r\n--{boundary}--\r\n".encode()

        res = c.post("/items", content=body(), headers={**KEY, "content-type": f"multipart/form-data; boundary={boundary}"})
        assert res.status_code == 413, res.text
        assert "limit" in res.json()["detail"]
        healthy(c)
        assert not list((run / "uploads").glob("*")) if (run / "uploads").exists() else True


class _Failing(TokenOverlapRetriever):
    """A retriever whose item lookups fail with a message holding an absolute path (a bug, not bad input)."""

    def item(self, item_id):
        if item_id.startswith("boom"):
            raise RuntimeError(f"cannot open /very/secret/path/{item_id}.db")
        return super().item(item_id)


def test_5_server_errors_give_a_request_id_and_no_details(tmp_path, caplog):
    root, items, _ = media_corpus(tmp_path)
    app = create_app(_Failing(items, root=root), ServeConfig())
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=20) as c, caplog.at_level("ERROR", logger="ace.serving.server"):
            res = c.get("/items/boom1")
        assert res.status_code == 500
        body = res.json()
        assert "secret" not in res.text and "RuntimeError" not in res.text
        assert body["request_id"] and body["request_id"] in res.headers.get("x-request-id", "")
        assert any(body["request_id"] in rec.getMessage() for rec in caplog.records)
        assert "secret" in caplog.text  # the details go to the server log
        with httpx.Client(base_url=url, timeout=20) as c:  # a new connection: the server closes one after a 500
            assert c.get("/items/img/red").status_code == 200


def test_5_stats_has_no_absolute_paths(run, text_encoder):
    with serving(run, text_encoder) as (c, r):
        stats = c.get("/stats")
        assert stats.status_code == 200
        assert str(run) not in stats.text and str(run.parent) not in stats.text


# ---------------------------------------------------------------------------------- break 6
def test_6_uploads_live_in_the_run_not_in_the_shared_corpus_root(run, text_encoder, tmp_path):
    other = tmp_path / "other_run"  # a second run of the same corpus (same corpus root)
    shutil.copytree(run, other)
    with serving(run, text_encoder) as (c, r):
        assert upload(c, "up/1", "audio", "bark.wav", wav_bytes(0.3), "audio/wav").status_code == 201
    with serving(other, text_encoder) as (c, r):
        res = upload(c, "up/1", "audio", "bark.wav", wav_bytes(0.4), "audio/wav")
        assert res.status_code == 201, res.text
        assert c.get("/media/up/1").content == wav_bytes(0.4)
    assert not (run.parent / "media" / "uploads").exists() or not list((run.parent / "media" / "uploads").iterdir())
    assert len(list((run / "uploads").iterdir())) == 1 and len(list((other / "uploads").iterdir())) == 1
    shutil.rmtree(other)  # the run's files go with the run
    with serving(run, text_encoder) as (c, r):  # restart
        assert c.get("/media/up/1").content == wav_bytes(0.3)


# ---------------------------------------------------------------------------------- loading never dies on one row
def test_rows_that_cannot_be_restored_are_quarantined_and_the_rest_is_served(run, text_encoder):
    """Rows written by older code (or by hand) that cannot be served: a NUL id, a lone surrogate in a
    caption, bad JSON, an identifier that another row already holds. The run loads, serves the rest,
    and reports each bad row (log and /stats)."""
    r = load(run, text_encoder)
    good = r.add_items([CorpusItem(f"good/{n}", "image", embedding=np.asarray(vec(n)), captions=["fine"])
                        for n in range(3)])
    r.close()
    con = sqlite3.connect(run / "store.sqlite")
    con.execute("DROP INDEX items_identifier")  # as in a file migrated from version 2 with clashing rows
    cols = [c[1] for c in con.execute("PRAGMA table_info(items)") if c[1] != "seq"]
    template = dict(zip(cols, con.execute(f"SELECT {', '.join(cols)} FROM items WHERE item_id='good/0'").fetchone()))
    bad = [
        {"item_id": "nul\x00id", "identifier": json.dumps([0, 0, 0, 900])},
        {"item_id": "surrogate", "captions": '["\\ud800"]', "identifier": json.dumps([0, 0, 0, 901])},
        {"item_id": "badjson", "metadata": "{not json", "identifier": json.dumps([0, 0, 0, 902])},
        {"item_id": "clash", "identifier": json.dumps(list(good[1]))},  # the identifier of good/1
    ]
    for row in bad:
        values = {**template, **row}
        con.execute(f"INSERT INTO items ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [values[c] for c in cols])
    con.commit()
    con.close()
    with serving(run, text_encoder) as (c, r):  # restart
        healthy(c)
        for n in range(3):
            assert c.get(f"/items/good%2F{n}").status_code == 200
        stats = c.get("/stats").json()
        report = stats["quarantined"]
        assert report["count"] == 4
        reasons = {q["item_id"]: q["reason"] for q in report["items"]}
        assert "U+0000" in reasons["nul\x00id"] and "surrogate" in reasons["surrogate"]
        assert "decoded" in reasons["badjson"] and "clash" in reasons
        assert c.get("/items/surrogate").status_code == 404
        res = c.post("/items", headers=KEY, json={"item_id": "clash", "modality": "image", "embedding": vec(9)})
        assert res.status_code == 409  # a quarantined id stays taken
        assert c.post("/items", headers=KEY, json={"item_id": "new/1", "modality": "image",
                                                   "embedding": vec(10)}).status_code == 201
    with serving(run, text_encoder) as (c, r):  # and again: same report, new item kept
        assert c.get("/stats").json()["quarantined"]["count"] == 4
        assert c.get("/items/new%2F1").status_code == 200


# ---------------------------------------------------------------------------------- mixed micro-batches
def test_mixed_k_and_modality_share_one_retriever_call_with_the_results_of_separate_calls(run, text_encoder):
    """k above the run's default beam width (10 here) needs wider beams for that query alone: the micro-batch
    still makes one retriever call (one encoder pass, one decode per width), with the results of separate calls."""
    r = load(run, text_encoder)
    assert r.default_beams == 10
    asks = [("a red car", 1, None), ("a blue tree", 3, "image"), ("a green boat", 15, None), ("black dog", 2, "image"),
            ("a red house", 4, "video"), ("a small cat", 12, "image")]  # no video items: no hits
    expected = [[h.item_id for h in r.search([q], k=k, modality=m)[0]] for q, k, m in asks]
    app = create_app(r, ServeConfig(max_wait_ms=300.0))
    try:
        with running_server(app) as url:
            barrier = threading.Barrier(len(asks))
            got: list = [None] * len(asks)

            def ask(n: int) -> None:
                q, k, m = asks[n]
                with httpx.Client(base_url=url, timeout=60) as c:
                    barrier.wait()
                    got[n] = c.post("/search", json={"query": q, "k": k, **({"modality": m} if m else {})}).json()

            threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(asks))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with httpx.Client(base_url=url, timeout=60) as c:
                batches = c.get("/stats").json()["batches"]
        assert [[h["item_id"] for h in g["results"]] for g in got] == expected
        assert batches["retriever_calls"] == batches["count"] < len(asks), batches  # one call per micro-batch
    finally:
        r.close()


# ---------------------------------------------------------------------------------- found by the CI fuzz step
def test_an_overlong_media_path_is_a_422_naming_the_item_not_a_500(run, text_encoder):
    """schemathesis (scripts/api_fuzz.py): a 4,000-character media file name reached the file system (ENAMETOOLONG)."""
    with serving(run, text_encoder) as (c, r):
        item = {"item_id": "long-media", "modality": "text", "media": "0" * 4000, "captions": ["x"]}
        res = c.post("/items", json=item, headers=KEY)
        assert res.status_code == 422, res.text
        assert "long-media" in res.json()["detail"] and "media path" in res.json()["detail"]
        healthy(c)


def test_hybrid_mode_on_a_run_without_hybrid_vectors_is_a_422_naming_the_mode(run, text_encoder):
    """A schema-valid search for a mode the run cannot serve is a 422 on `mode`, not a 400 (schemathesis ST202)."""
    with serving(run, text_encoder) as (c, r):
        assert r.hybrid is None
        res = c.post("/search", json={"query": "a red car", "k": 3, "mode": "hybrid"})
        assert res.status_code == 422, res.text
        assert res.json()["detail"].startswith("mode:") and "RUN/hybrid" in res.json()["detail"]
        healthy(c)
