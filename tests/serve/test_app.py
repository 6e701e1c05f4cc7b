"""The endpoints: health, models, completions and chat (plain and streamed), equal to rnnlab.Stream."""
import json

import torch

import rnnlab
from rnnlab.serve.app import render_chat


def _direct(model_dir, text, n, temperature=0.0, seed=None):
    """``n`` tokens after ``text`` from rnnlab.Stream run directly, as ids."""
    model = rnnlab.load_model(model_dir).eval()
    s = rnnlab.Stream(model)
    s.feed(rnnlab.ByteTokenizer()(text))
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return [int(t[0]) for t in s.sample(n, temperature, generator=g)]


def _text(ids):
    return rnnlab.ByteTokenizer().decode([i for i in ids if i < 256])


def test_health_and_models(make_client):
    c = make_client(model_name="tiny-model")
    assert c.get("/health").json()["status"] == "ok"
    data = c.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-model"] and data[0]["batch_rows"] == 8


def test_greedy_completion_equals_stream(make_client, model_dir):
    c = make_client()
    r = c.post("/v1/completions", json={"prompt": "def main():", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = _direct(model_dir, "def main():", 12)
    assert 257 not in ids  # the byte tokenizer's eos would end the answer early
    assert body["choices"][0]["text"] == _text(ids)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["index"] == 0
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}


def test_seeded_sampling_equals_stream_and_repeats(make_client, model_dir):
    c = make_client()
    req = {"prompt": "hello", "max_tokens": 10, "temperature": 0.9, "seed": 7}
    a = c.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = c.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b == _text(_direct(model_dir, "hello", 10, 0.9, seed=7))
    other = c.post("/v1/completions", json={**req, "seed": 8}).json()["choices"][0]["text"]
    assert other != a


def test_stop_string_cuts_the_answer(make_client, model_dir):
    full = _text(_direct(model_dir, "abc", 12))
    stop = full[4:6]
    c = make_client()
    body = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0,
                                           "stop": [stop]}).json()
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def _events(r):
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_streamed_completion_is_the_same_text(make_client):
    c = make_client()
    req = {"prompt": "x = ", "max_tokens": 9, "temperature": 0}
    plain = c.post("/v1/completions", json=req).json()
    r = c.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r)
    assert len(chunks) >= 2
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == plain["usage"]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])


def test_chat_completion_and_stream(make_client, model_dir):
    c = make_client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat([type("M", (), m) for m in messages]) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    body = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
    expected = _text(_direct(model_dir, "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", 8)).split("\n<|")[0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    chunks = _events(c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                          "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == expected


def test_fresh_text_opens_with_bos_when_the_run_was_trained_so(make_client, model_dir, tmp_path):
    """A run trained with --bos (run.json data.bos) is served with BOS before every fresh prompt and
    session prefix, as `rnnlab generate` does; --no-bos (bos=False) and plain model directories don't."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    (run / "run.json").write_text(json.dumps({"data": {"bos": True}, "seq_len": 16, "tokenizer": "bytes"}))
    bos = rnnlab.ByteTokenizer().bos_id

    def direct(ids, n):
        s = rnnlab.Stream(rnnlab.load_model(model_dir).eval())
        s.feed(torch.tensor([ids]))
        return _text([int(t[0]) for t in s.sample(n, 0.0)])

    prompt = list(b"def main():")
    ask = {"prompt": "def main():", "max_tokens": 12, "temperature": 0}
    with_bos, without = direct([bos] + prompt, 12), direct(prompt, 12)
    assert with_bos != without  # the test can tell the two apart
    r = make_client(run).post("/v1/completions", json=ask).json()
    assert r["choices"][0]["text"] == with_bos and r["usage"]["prompt_tokens"] == 12
    assert make_client(run, bos=False).post("/v1/completions", json=ask).json()["choices"][0]["text"] == without
    assert make_client(model_dir).post("/v1/completions", json=ask).json()["choices"][0]["text"] == without
    c = make_client(run)  # a session's prefix opens with BOS too; its next turn continues without one
    sid = c.post("/v1/sessions", json={"prefix": "def main():"}).json()["id"]
    turn = c.post("/v1/completions", json={**ask, "prompt": "", "session": sid})
    assert turn.status_code == 200, turn.text
    assert turn.json()["choices"][0]["text"] == with_bos
