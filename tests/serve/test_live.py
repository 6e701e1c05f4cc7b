"""A real server process, talked to over HTTP as clients would: httpx and the official openai client."""
import json

import httpx
import pytest

openai = pytest.importorskip("openai")

KEY = "live-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_httpx_completion_streamed_and_not(live_server):
    server = live_server("--api-key", KEY)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
    whole = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).json()
    assert whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_client(live_server):
    server = live_server("--api-key", KEY)
    client = _client(server)
    (model,) = [m.id for m in client.models.list()]
    done = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="x", max_tokens=10 ** 6)


def test_session_resumed_after_a_restart(live_server):
    first = live_server("--api-key", KEY)
    client = _client(first)
    http = httpx.Client(base_url=first.url, headers=AUTH)
    sid = http.post("/v1/sessions", json={"prefix": "A story: "}).json()["id"]
    turn = client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0,
                                     extra_body={"session": sid})
    assert turn.model_extra["session"] == sid
    fork = http.post("/v1/sessions", json={"fork": sid}).json()["id"]
    ask = {"model": "tiny", "prompt": " then", "max_tokens": 6, "temperature": 0}
    expected = http.post("/v1/completions", json={**ask, "session": fork}).json()["choices"][0]["text"]
    seen = http.get(f"/v1/sessions/{sid}").json()["tokens_seen"]
    assert seen == len("A story: ") + len("Once") + 5
    http.close()
    first.stop()

    second = live_server("--api-key", KEY)  # a new process on the same sessions directory
    with httpx.Client(base_url=second.url, headers=AUTH) as http:
        assert http.get(f"/v1/sessions/{sid}").json()["tokens_seen"] == seen
    resumed = _client(second).completions.create(**ask, extra_body={"session": sid})
    assert resumed.choices[0].text == expected


def test_bench_serve_quick(tmp_path, capsys, no_server_left):
    import rnnlab.cli as cli
    out = tmp_path / "serve.json"
    rows = cli.main(["bench", "serve", "--quick", "--json", str(out)])
    assert [r["model"] for r in rows] == ["gated_deltanet*2,gla*2", "attention"]
    for r in rows:
        assert r["requests"] == 4 and r["failed"] == 0 and r["requests_per_s"] > 0
        assert r["completion_tokens_per_s"] == pytest.approx(4 * r["requests_per_s"])  # 4 tokens each
        assert 0 < r["p50_s"] <= r["p99_s"]
    assert json.loads(out.read_text()) == rows
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "serve" and last["results"] == rows


def test_bench_serve_bad_arguments(tmp_path, capsys):
    import rnnlab.cli as cli
    for argv, named in ((["--model", str(tmp_path / "nosuch")], "--model"),
                        (["--model", str(tmp_path), "--layouts", "attention"], "--layouts"),
                        (["--layouts", "nosuchmixer"], "nosuchmixer"), (["--clients", "0"], "--clients")):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "serve", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
