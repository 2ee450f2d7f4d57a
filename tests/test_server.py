"""The HTTP server against a real uvicorn on 127.0.0.1: search = library call, media, traversal, 4xx, batching, auth."""
import asyncio
import http.client
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from ace.config import ServeConfig
from ace.data.corpus import resolve_media_file
from ace.serving.server import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
from serving_support import TokenOverlapRetriever, media_corpus, png_bytes, running_server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return media_corpus(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(corpus):
    root, items, secret = corpus
    retriever = TokenOverlapRetriever(items, root=root)
    app = create_app(retriever, ServeConfig(max_wait_ms=2.0, max_body_bytes=4096, max_beams=16))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        yield client, retriever, url


def _expected(retriever, query, k=10, modality=None, beams=None):
    hits = retriever.search([query], k=k, num_beams=beams, modality=modality)[0]
    return [(h.item_id, h.modality, h.score, list(h.identifier), h.source) for h in hits]


@pytest.mark.parametrize("body", [
    {"query": "a red square"},
    {"query": "dog barks", "k": 3},
    {"query": "square", "k": 2, "modality": "image"},
    {"query": "wave sea", "k": 100, "beams": 4},
    {"query": "nothing matches zzz", "k": 1, "modality": "video"},
])
def test_search_equals_library_call(served, body):
    client, retriever, _ = served
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    got = [(h["item_id"], h["modality"], h["score"], h["identifier"], h["source"]) for h in data["results"]]
    assert got == _expected(retriever, body["query"], body.get("k", 10), body.get("modality"), body.get("beams"))
    assert data["k"] == body.get("k", 10)
    for h in data["results"]:
        item = retriever.item(h["item_id"])
        assert h["captions"] == item.captions[:1]  # result_captions=1; /items gives all
        assert (h["media_url"] is None) == (item.media is None)


def test_openapi_schema_published(served):
    client, _, _ = served
    schema = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/media/{item_id}", "/health", "/stats"} <= set(schema["paths"])
    req = schema["components"]["schemas"]["SearchRequest"]
    assert req["required"] == ["query"] and req["properties"]["k"]["anyOf"][0]["maximum"] == 100
    assert client.get("/docs").status_code == 200


def test_health_and_stats(served):
    client, _, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    for _ in range(3):
        assert client.post("/search", json={"query": "red"}).status_code == 200
    stats = client.get("/stats").json()
    assert stats["items"] == 10 and stats["queries_served"] >= 3
    assert stats["latency_ms"]["p50"] > 0 and stats["latency_ms"]["p99"] >= stats["latency_ms"]["p50"]
    assert stats["model_version"] == "token-overlap-test" and stats["identifier_version"] == 1
    assert stats["batches"]["count"] >= 1


def test_items_endpoint(served):
    client, _, _ = served
    r = client.get("/items/img/red")  # ids may contain '/'
    assert r.status_code == 200
    assert r.json()["captions"] == ["a red square on a table", "red box"]
    hit = client.post("/search", json={"query": "red box", "k": 1}).json()["results"][0]
    assert hit["item_id"] == "img/red" and hit["captions"] == ["a red square on a table"]
    assert r.json()["media_url"] == "/media/img%2Fred"
    r = client.get("/items/no-such-item")
    assert r.status_code == 404 and "unknown item id" in r.json()["detail"]


def test_media_streaming(served, corpus):
    client, _, _ = served
    root = corpus[0]
    r = client.get("/media/img%2Fred")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (root / "img" / "red.png").read_bytes()
    r = client.get("/media/aud/bark")
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
    assert r.content == (root / "aud" / "bark.wav").read_bytes()
    part = client.get("/media/aud/bark", headers={"Range": "bytes=0-11"})
    assert part.status_code == 206 and part.content == r.content[:12]
    assert client.get("/media/img/blue").content == png_bytes((20, 20, 220))  # absolute path inside the root
    assert client.get("/media/img/link_in").content == (root / "img" / "red.png").read_bytes()  # symlink inside
    assert client.get("/media/img/missing").status_code == 404
    assert client.get("/media/txt/poem").status_code == 404  # no media file


@pytest.mark.parametrize("item_id", ["evil/dotdot", "evil/abs", "evil/symlink"])
def test_media_outside_root_refused(served, item_id):
    client, _, _ = served
    r = client.get(f"/media/{item_id}")
    assert r.status_code == 403 and "outside the corpus root" in r.json()["detail"]
    assert "TOP SECRET" not in r.text


@pytest.mark.parametrize("raw_path", [
    "/media/../secret.txt", "/media/../../secret.txt", "/media/..%2F..%2Fsecret.txt",
    "/media/%2e%2e/%2e%2e/secret.txt", "/media//etc/passwd", "/media/%2Fetc%2Fpasswd",
    "/media/img/../../secret.txt", "/static/../../secret.txt", "/static/%2e%2e/%2e%2e/secret.txt",
])
def test_request_paths_never_reach_the_filesystem(served, raw_path):
    _, _, url = served
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)  # sends the path unnormalised
    conn.request("GET", raw_path)
    resp = conn.getresponse()
    body = resp.read().decode(errors="replace")
    conn.close()
    assert 400 <= resp.status < 500, (raw_path, resp.status)
    assert "TOP SECRET" not in body and "root:" not in body


def test_resolve_media_file(corpus):
    root, _, _ = corpus
    assert resolve_media_file("img/red.png", root) == (root / "img" / "red.png").resolve()
    for bad in ("../secret.txt", "img/../../secret.txt", "/etc/passwd", "link_out.png"):
        with pytest.raises(PermissionError):
            resolve_media_file(bad, root)


MALFORMED = [
    ("not json", b"{", "application/json", 400, "malformed JSON"),
    ("invalid utf-8", b"\xff\xfe\xfa", "application/json", 400, "could not be parsed"),
    ("array", b"[1, 2]", "application/json", 422, "JSON object"),
    ("no body", b"", "application/json", 422, "request body is required"),
    ("text/plain", b'{"query": "dog"}', "text/plain", 422, "JSON object"),
    ("missing query", b"{}", "application/json", 422, "query"),
    ("empty query", b'{"query": ""}', "application/json", 422, "must not be empty"),
    ("blank query", b'{"query": "   "}', "application/json", 422, "must not be empty"),
    ("query not a string", b'{"query": 5}', "application/json", 422, "query"),
    ("query null", b'{"query": null}', "application/json", 422, "query"),
    ("k zero", b'{"query": "dog", "k": 0}', "application/json", 422, "k"),
    ("k too big", b'{"query": "dog", "k": 101}', "application/json", 422, "k"),
    ("k string", b'{"query": "dog", "k": "10"}', "application/json", 422, "k"),
    ("k float", b'{"query": "dog", "k": 2.5}', "application/json", 422, "k"),
    ("k bool", b'{"query": "dog", "k": true}', "application/json", 422, "k"),
    ("bad modality", b'{"query": "dog", "modality": "smell"}', "application/json", 422, "modality"),
    ("beams zero", b'{"query": "dog", "beams": 0}', "application/json", 422, "beams"),
    ("beams over limit", b'{"query": "dog", "beams": 1000}', "application/json", 422, "max_beams"),
    ("unknown field", b'{"query": "dog", "topk": 3}', "application/json", 422, "topk"),
    ("query too long", b'{"query": "' + b"a" * 513 + b'"}', "application/json", 422, "limit is 512"),
    ("body too large", b'{"query": "' + b"a" * 5000 + b'"}', "application/json", 413, "exceeds the limit"),
    ("retriever rejects", b'{"query": "BOOM now"}', "application/json", 400, "search rejected"),
]


@pytest.mark.parametrize("name,body,ctype,status,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_input_gets_4xx(served, name, body, ctype, status, message):
    client, _, _ = served
    r = client.post("/search", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_chunked_body_over_limit_gets_413(served):
    client, _, _ = served

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"query": "'
        for _ in range(20):
            yield b"a" * 500
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_other_methods_and_routes_4xx(served):
    client, _, _ = served
    assert client.get("/search").status_code == 405
    assert client.delete("/health").status_code == 405
    assert client.get("/no/such/route").status_code == 404


async def _concurrent(url, bodies):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/search", json=b) for b in bodies))


def test_concurrent_requests_are_micro_batched(corpus):
    root, items, _ = corpus
    retriever = TokenOverlapRetriever(items, root=root, delay_s=0.05)
    app = create_app(retriever, ServeConfig(max_batch=8, max_wait_ms=30.0))
    words = ["red", "blue square", "dog", "surfs wave", "poem sea", "link", "table"]
    bodies = [{"query": words[i % len(words)] + f" {i}", "k": 3} for i in range(24)]
    with running_server(app) as url:
        responses = asyncio.run(_concurrent(url, bodies))
    assert all(r.status_code == 200 for r in responses)
    for body, r in zip(bodies, responses):
        got = [(h["item_id"], h["modality"], h["score"], h["identifier"], h["source"]) for h in r.json()["results"]]
        assert got == _expected(retriever, body["query"], 3)
    sizes = retriever.calls[:-len(bodies)]  # _expected appended single-query calls after the served ones
    assert sum(sizes) == 24 and len(sizes) < 24 and max(sizes) <= 8 and max(sizes) > 1, sizes


def test_failing_query_does_not_fail_its_batch(corpus):
    root, items, _ = corpus
    retriever = TokenOverlapRetriever(items, root=root, delay_s=0.02)
    app = create_app(retriever, ServeConfig(max_batch=16, max_wait_ms=30.0))
    bodies = [{"query": "BOOM"}] + [{"query": f"red {i}"} for i in range(7)]
    with running_server(app) as url:
        responses = asyncio.run(_concurrent(url, bodies))
        stats = httpx.get(url + "/stats").json()
    assert responses[0].status_code == 400 and "BOOM" in responses[0].json()["detail"]
    assert all(r.status_code == 200 and r.json()["results"] for r in responses[1:])
    assert stats["queries_failed"] == 1 and stats["queries_served"] == 7


def test_queue_full_gets_503(corpus):
    root, items, _ = corpus
    retriever = TokenOverlapRetriever(items, root=root, delay_s=0.5)
    app = create_app(retriever, ServeConfig(max_batch=1, max_wait_ms=0.0, max_queue=1))
    with running_server(app) as url:
        responses = asyncio.run(_concurrent(url, [{"query": f"red {i}"} for i in range(8)]))
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert "server busy" in busy.json()["detail"] and busy.headers["retry-after"] == "1"


def _keyed_app(corpus, **cfg):
    root, items, _ = corpus
    # the write endpoints are keyed before anything else: this retriever is read-only, so a request
    # that passes the key check gets 501
    return create_app(TokenOverlapRetriever(items, root=root), ServeConfig(**cfg))


def test_api_key_for_reads_and_writes(corpus):
    app = _keyed_app(corpus, api_key="s3cret", read_requires_key=True)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert c.get("/health").status_code == 200  # liveness stays open
        r = c.post("/search", json={"query": "red"})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert c.post("/search", json={"query": "red"}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/search", json={"query": "red"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/media/img/red", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/media/img/red").status_code == 401
        r = c.post("/items", headers={"X-API-Key": "s3cret"})
        assert r.status_code == 501 and "cannot add items" in r.json()["detail"]
        assert c.delete("/items/img/red", headers={"X-API-Key": "s3cret"}).status_code == 501
        assert c.delete("/items/img/red").status_code == 401
        assert c.post("/items").status_code == 401


def test_writes_disabled_without_key_reads_open(corpus, monkeypatch):
    monkeypatch.delenv("ACE_API_KEY", raising=False)
    app = _keyed_app(corpus)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert c.post("/search", json={"query": "red"}).status_code == 200
        r = c.post("/items", headers={"X-API-Key": "anything"})
        assert r.status_code == 403 and "no API key configured" in r.json()["detail"]
    monkeypatch.setenv("ACE_API_KEY", "from-env")
    app = _keyed_app(corpus)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert c.post("/items", headers={"X-API-Key": "from-env"}).status_code == 501


def test_serve_config_validation():
    with pytest.raises(ValueError, match="max_k"):
        ServeConfig(max_k=101)
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)


def test_media_root_must_exist(corpus, tmp_path):
    _, items, _ = corpus
    with pytest.raises(ValueError, match="media root is not a directory"):
        create_app(TokenOverlapRetriever(items), ServeConfig(), media_root=tmp_path / "nope")


def test_serve_cli_rejects_bad_arguments(tmp_path, capsys):
    import serve
    assert serve.main(["--run", str(tmp_path / "no-run")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert serve.main(["--run", str(tmp_path), "max_bach=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert serve.main(["--run", str(tmp_path), "max_k=500"]) == 2
    assert "max_k" in capsys.readouterr().err


class _ValueErrorItems(TokenOverlapRetriever):
    """Like ace.serving.retriever.Retriever: item() raises a ValueError subclass for unknown ids."""

    def item(self, item_id):
        if item_id not in self.items:
            raise ValueError(f"unknown item id {item_id!r}")
        return self.items[item_id]


def test_unknown_item_as_value_error_is_404(corpus):
    root, items, _ = corpus
    app = create_app(_ValueErrorItems(items, root=root), ServeConfig())
    with running_server(app) as url, httpx.Client(base_url=url, timeout=20) as c:
        assert c.get("/items/ghost").status_code == 404
        assert c.get("/media/ghost").status_code == 404
        assert c.get("/items/img/red").status_code == 200


def test_load_test_client(served, corpus):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from load_test import run_load
    _, _, url = served
    res = asyncio.run(run_load(url, ["red square", "dog"], clients=4, searches=40, k=3, max_seconds=60, api_key=None))
    assert res["ok"] == 40 and res["errors"] == {} and res["searches_sent"] == 40
    assert res["p99_ms"] >= res["p50_ms"] > 0 and res["server_batches"]["count"] >= 1
    app = _keyed_app(corpus, api_key="k", read_requires_key=True)
    with running_server(app) as keyed:
        res = asyncio.run(run_load(keyed, ["red"], clients=2, searches=6, k=3, max_seconds=60, api_key="wrong"))
    assert res["ok"] == 0 and res["errors"] == {"401": 6}


def test_serve_cli_reports_an_incomplete_run(tmp_path, capsys):
    import serve
    (tmp_path / "corpus.jsonl").write_text("")
    assert serve.main(["--run", str(tmp_path)]) == 2
    assert "not a trained run" in capsys.readouterr().err
