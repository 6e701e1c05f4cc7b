"""Safety: API keys, limits and malformed requests get 4xx JSON errors naming the field or limit."""
import pytest


def _err(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param"}
    if param is not None:
        assert err["param"] == param and param.split(".")[0] in err["message"], err
    return err


def test_api_key_guards_everything_but_health(make_client):
    c = make_client(api_key="s3cret")
    assert c.get("/health").status_code == 200
    for method, url, body in (("get", "/v1/models", None), ("post", "/v1/completions", {"prompt": "a"}),
                              ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
                              ("post", "/v1/sessions", {}), ("get", "/v1/sessions/" + "a" * 32, None),
                              ("delete", "/v1/sessions/" + "a" * 32, None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            err = _err(c.request(method, url, json=body, headers=headers), 401, "authorization")
            assert err["type"] == "authentication_error"
    ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for url in ("/docs", "/redoc", "/openapi.json"):  # the schema and docs are not served around the key
        _err(c.get(url), 404)
    assert make_client().get("/openapi.json").status_code == 200  # without a key they are


def test_api_key_from_the_environment(monkeypatch, model_dir, tmp_path):
    """rnnlab serve reads RNNLAB_API_KEY when --api-key is not given."""
    import rnnlab.cli as cli
    seen = {}
    monkeypatch.setenv("RNNLAB_API_KEY", "from-env")
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    cli.main(["serve", "--model", str(model_dir), "--port", "9001", "--sessions-dir", str(tmp_path / "s")])
    from fastapi.testclient import TestClient
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    assert seen["port"] == 9001 and seen["host"] == "127.0.0.1"


def test_limits(make_client):
    c = make_client(max_prompt_tokens=8, max_tokens=5, default_max_tokens=5, max_sessions=2, max_concurrent=1)
    _err(c.post("/v1/completions", json={"prompt": "123456789"}), 400, "prompt")
    _err(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}]}), 400, "messages")
    _err(c.post("/v1/sessions", json={"prefix": "123456789"}), 400, "prefix")
    err = _err(c.post("/v1/completions", json={"prompt": "1", "max_tokens": 6}), 400, "max_tokens")
    assert "max_tokens=5" in err["message"]
    assert c.post("/v1/completions", json={"prompt": "12345678", "max_tokens": 5}).status_code == 200
    sid = c.post("/v1/sessions").json()["id"]
    c.post("/v1/sessions")
    err = _err(c.post("/v1/sessions"), 429)
    assert "max_sessions=2" in err["message"]
    c.delete(f"/v1/sessions/{sid}")
    assert c.post("/v1/sessions").status_code == 201
    slots = c.app.state.in_flight
    assert slots.take()  # another request holds the only slot
    err = _err(c.post("/v1/completions", json={"prompt": "a"}), 429)
    assert "max_concurrent=1" in err["message"] and err["type"] == "rate_limit_error"
    slots.give()
    assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    assert slots.used == 0  # every request gave its slot back, refused ones included


def test_request_body_size_is_capped(make_client):
    """A body over max_body_bytes is a 413 naming the limit, whether its Content-Length says so or
    it arrives in chunks without one; a body within it is answered."""
    c = make_client(max_body_bytes=200)
    err = _err(c.post("/v1/completions", json={"prompt": "a" * 300}), 413)
    assert "max_body_bytes=200" in err["message"] and "Content-Length" in err["message"]
    chunks = iter([b'{"prompt": "', b"a" * 150, b"a" * 150, b'"}'])  # no Content-Length: streamed
    err = _err(c.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"}), 413)
    assert "max_body_bytes=200" in err["message"]
    assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    assert c.app.state.in_flight.used == 0


BAD = [  # (endpoint, body, the field named)
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.1}, "top_p"),
    ("/v1/completions", {"prompt": "a", "seed": -3}, "seed"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "a", "session": 12}, "session"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/v1/sessions", {"prefix": 3}, "prefix"),
    ("/v1/sessions", {"prefix": "a", "fork": "b" * 32}, "fork"),
    ("/v1/sessions", {"parent": "x"}, "parent"),
]


@pytest.mark.parametrize("url,body,param", BAD, ids=[f"{u.split('/')[-1]}-{p}-{i}" for i, (u, _, p) in enumerate(BAD)])
def test_bad_request_names_the_field(make_client, url, body, param):
    c = make_client()
    status = 404 if param == "model" else 400
    _err(c.post(url, json=body), status, param)


def test_malformed_bodies(make_client):
    c = make_client()
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"):
        r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw, r.text)
        assert "error" in r.json()
    json_type = {"content-type": "application/json"}
    err = _err(c.post("/v1/completions", content=b'{"prompt": "a",}', headers=json_type), 400)
    assert err["param"] is None and "not valid JSON" in err["message"]
    for url, raw, param in (("/v1/completions", b'{"prompt": "a\\ud800"}', "prompt"),
                            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                             "messages"),
                            ("/v1/sessions", b'{"prefix": "\\ud83d"}', "prefix")):  # valid JSON, no valid text
        err = _err(c.post(url, content=raw, headers=json_type), 400, param)
        assert "surrogate" in err["message"]
    r = c.post("/v1/completions", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in _err(r, 400)["message"]
    _err(c.get("/v1/nothing"), 404)
    assert 400 <= c.put("/v1/completions", json={"prompt": "a"}).status_code < 500


def test_a_bad_request_does_not_touch_a_session(make_client):
    c = make_client()
    sid = c.post("/v1/sessions", json={"prefix": "mine"}).json()["id"]
    before = c.get(f"/v1/sessions/{sid}").json()
    for body in ({"prompt": "x", "session": sid, "max_tokens": 10 ** 9}, {"prompt": "x", "session": sid, "top_p": 2},
                 {"prompt": "x" * 10000, "session": sid}):
        assert 400 <= c.post("/v1/completions", json=body).status_code < 500
    assert c.get(f"/v1/sessions/{sid}").json() == before
    ok = c.post("/v1/completions", json={"prompt": "x", "session": sid, "max_tokens": 2})
    assert ok.status_code == 200  # not left marked busy by the refused requests


def test_one_turn_at_a_time_per_session(make_client):
    c = make_client()
    sid = c.post("/v1/sessions", json={"prefix": "p"}).json()["id"]
    c.app.state.sessions.acquire(sid)  # another request is answering in this session
    err = _err(c.post("/v1/completions", json={"prompt": "a", "session": sid}), 409, "session")
    assert err["type"] == "conflict_error"
    _err(c.delete(f"/v1/sessions/{sid}"), 409, "session_id")
    c.app.state.sessions.release(sid)
    assert c.post("/v1/completions", json={"prompt": "a", "session": sid, "max_tokens": 1}).status_code == 200


def test_serve_without_the_extra_is_one_line(monkeypatch, model_dir, capsys):
    import sys

    import rnnlab.cli as cli
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model", str(model_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'rnnlab[serve]'" in err


def test_bad_serve_flags(model_dir, tmp_path, capsys):
    import rnnlab.cli as cli
    (tmp_path / "f").write_text("x")
    for argv in (["--max-batch", "0"], ["--default-max-tokens", "50", "--max-tokens", "10"],
                 ["--sessions-dir", str(tmp_path / "f")], ["--port", "0"], ["--model", str(tmp_path / "nosuch")]):
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--model", str(model_dir), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and argv[0 if argv[0] != "--model" else 1] in err
