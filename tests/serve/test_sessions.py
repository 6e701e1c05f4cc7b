"""Sessions: O(1) turns (tokens fed counted), state files that survive a restart, forks, deletion, LRU."""
import torch

import rnnlab


def _counting(model_dir):
    """The served model with a counter of the tokens it is fed."""
    model = rnnlab.load_model(model_dir).eval()
    fed = [0]
    model.register_forward_pre_hook(lambda _m, args: fed.__setitem__(0, fed[0] + args[0].numel()))
    return model, fed


def _greedy(stream, n):
    return rnnlab.ByteTokenizer().decode([int(t[0]) for t in stream.sample(n, 0.0)])


def test_session_turn_reads_only_its_new_tokens(make_client, model_dir):
    model, fed = _counting(model_dir)
    c = make_client(model=model)
    sid = c.post("/v1/sessions", json={"prefix": "a long document " * 20}).json()["id"]
    assert fed[0] == 320
    costs = []
    for turn in range(3):
        before = fed[0]
        r = c.post("/v1/completions", json={"prompt": f"question {turn}?", "max_tokens": 5, "temperature": 0,
                                            "session": sid})
        assert r.status_code == 200 and r.json()["session"] == sid
        costs.append(fed[0] - before)
    assert costs == [11 + 5] * 3  # the prompt and the answer, whatever the conversation's length
    info = c.get(f"/v1/sessions/{sid}").json()
    assert info["tokens_seen"] == 320 + 3 * 16
    assert info["state_bytes"] == model.init_state(1).nbytes > 0


def test_session_survives_a_restart_exactly(make_client, model_dir, tmp_path):
    first = make_client(sessions_dir=str(tmp_path / "s"))
    sid = first.post("/v1/sessions", json={"prefix": "Once upon a time"}).json()["id"]
    one = first.post("/v1/completions", json={"prompt": ", there", "max_tokens": 6, "temperature": 0,
                                              "session": sid}).json()["choices"][0]["text"]
    second = make_client(sessions_dir=str(tmp_path / "s"))  # a new server on the same directory
    two = second.post("/v1/completions", json={"prompt": " and then", "max_tokens": 7, "temperature": 0,
                                               "session": sid}).json()["choices"][0]["text"]
    s = rnnlab.Stream(rnnlab.load_model(model_dir).eval())
    tok = rnnlab.ByteTokenizer()
    s.feed(tok("Once upon a time"))
    s.feed(tok(", there"))
    assert _greedy(s, 6) == one
    s.feed(tok(" and then"))
    assert _greedy(s, 7) == two


def test_forks_are_independent(make_client):
    c = make_client()
    base = c.post("/v1/sessions", json={"prefix": "shared context: "}).json()["id"]
    fork = c.post("/v1/sessions", json={"fork": base}).json()
    assert fork["id"] != base and fork["tokens_seen"] == 16
    ask = {"max_tokens": 6, "temperature": 0}
    a1 = c.post("/v1/completions", json={**ask, "prompt": "A", "session": fork["id"]}).json()["choices"][0]["text"]
    c.post("/v1/completions", json={**ask, "prompt": "something else entirely", "session": base})
    assert c.get(f"/v1/sessions/{fork['id']}").json()["tokens_seen"] == 16 + 1 + 6
    again = c.post("/v1/sessions", json={"fork": base}).json()["id"]  # base has moved on: the fork has not
    assert c.get(f"/v1/sessions/{again}").json()["tokens_seen"] == 16 + 23 + 6
    fresh = c.post("/v1/sessions", json={"prefix": "shared context: "}).json()["id"]
    a2 = c.post("/v1/completions", json={**ask, "prompt": "A", "session": fresh}).json()["choices"][0]["text"]
    assert a1 == a2


def test_empty_session_then_chat_turns(make_client, model_dir):
    c = make_client()
    sid = c.post("/v1/sessions").json()["id"]
    assert c.get(f"/v1/sessions/{sid}").json()["tokens_seen"] == 0
    r = c.post("/v1/completions", json={"prompt": "", "session": sid})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    msg = {"role": "user", "content": "hi"}
    r = c.post("/v1/chat/completions", json={"messages": [msg], "max_tokens": 4, "temperature": 0, "session": sid})
    assert r.status_code == 200
    n = c.get(f"/v1/sessions/{sid}").json()["tokens_seen"]
    assert n == len("<|user|>\nhi\n<|assistant|>\n") + r.json()["usage"]["completion_tokens"]
    r = c.post("/v1/completions", json={"prompt": "", "max_tokens": 3, "session": sid})  # continue the answer
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 0


def test_delete_and_unknown_sessions(make_client, tmp_path):
    c = make_client()
    sid = c.post("/v1/sessions", json={"prefix": "x"}).json()["id"]
    assert len(sid) >= 32 and (tmp_path / "sessions" / f"{sid}.safetensors").is_file()
    assert c.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert not (tmp_path / "sessions" / f"{sid}.safetensors").exists()
    for method, url, body in (("get", f"/v1/sessions/{sid}", None), ("delete", f"/v1/sessions/{sid}", None),
                              ("post", "/v1/completions", {"prompt": "a", "session": sid}),
                              ("post", "/v1/sessions", {"fork": sid}),
                              ("get", "/v1/sessions/..%2F..%2Fetc%2Fpasswd", None)):
        r = c.request(method, url, json=body)
        assert r.status_code == 404, (url, r.text)
        assert r.json()["error"]["type"] == "not_found_error"


def test_memory_cache_is_bounded_and_files_are_the_truth(make_client):
    c = make_client(session_cache=2)
    ids = [c.post("/v1/sessions", json={"prefix": f"session {i}"}).json()["id"] for i in range(4)]
    store = c.app.state.sessions
    assert len(store._cache) == 2 and store.count() == 4
    assert [c.get(f"/v1/sessions/{i}").json()["tokens_seen"] for i in ids] == [9] * 4
    state = store.get(ids[0]).state
    assert isinstance(state, rnnlab.ModelState) and state.layers[0].batch_size == 1
    assert torch.isfinite(store.get(ids[0]).logits).all()


def test_streamed_turn_stores_the_session(make_client):
    c = make_client()
    sid = c.post("/v1/sessions", json={"prefix": "ab"}).json()["id"]
    r = c.post("/v1/completions", json={"prompt": "cd", "max_tokens": 4, "temperature": 0, "session": sid,
                                        "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert '"session": "%s"' % sid in r.text
    assert c.get(f"/v1/sessions/{sid}").json()["tokens_seen"] == 2 + 2 + 4
    again = c.post("/v1/completions", json={"prompt": "e", "max_tokens": 1, "session": sid})
    assert again.status_code == 200  # the streamed turn released the session


def test_a_killed_write_does_not_count_as_a_session(make_client, tmp_path):
    """A server killed while writing a state leaves a temp file (ours, ``.tmp-*``, or the safetensors
    writer's own, ``.tmpXXXXXX``): it is not a session, and the next server removes it."""
    (tmp_path / "sessions").mkdir()
    ours = tmp_path / "sessions" / ".tmp-k1ll3d_abcdefghijklmnop.safetensors"
    writers = tmp_path / "sessions" / ".tmpDP3XWY"
    for p in (ours, writers):
        p.write_bytes(b"half a file")
    c = make_client(max_sessions=1)
    assert not ours.exists() and not writers.exists()
    assert c.post("/v1/sessions").status_code == 201
    assert c.app.state.sessions.count() == 1


def test_sessions_of_another_model(make_client, tmp_path, capsys):
    """A sessions directory of another model is refused when the server starts; a foreign or
    damaged file among good ones is a 409 for that session alone, which can then be deleted."""
    import pytest

    import rnnlab.cli as cli
    d = tmp_path / "s"
    c = make_client(sessions_dir=str(d))
    sid = c.post("/v1/sessions", json={"prefix": "mine"}).json()["id"]
    other = rnnlab.build_model(layout="gla", n_layers=1, d_model=16)
    with pytest.raises(ValueError, match="sessions_dir"):
        make_client(model=other, sessions_dir=str(d))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model", str(tmp_path / "other"), "--sessions-dir", str(d)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--sessions-dir" in err
    stray, damaged = "f" * 32, "d" * 32
    rnnlab.save_state(other(torch.randint(0, 256, (1, 3)))[1], d / f"{stray}.safetensors", model=other)
    (d / f"{damaged}.safetensors").write_bytes(b"not a state")
    for bad in (stray, damaged):
        for method, url, body, param in (("get", f"/v1/sessions/{bad}", None, "session_id"),
                                         ("post", "/v1/completions", {"prompt": "a", "session": bad}, "session"),
                                         ("post", "/v1/sessions", {"fork": bad}, "fork")):
            r = c.request(method, url, json=body)
            assert r.status_code == 409 and r.json()["error"]["param"] == param, r.text
        assert c.delete(f"/v1/sessions/{bad}").status_code == 200
    assert c.post("/v1/completions", json={"prompt": "a", "session": sid, "max_tokens": 1}).status_code == 200
