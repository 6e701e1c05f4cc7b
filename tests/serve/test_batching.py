"""Continuous batching: jobs decoded together (joining and leaving between steps) equal each alone."""
import threading

import pytest
import torch

import rnnlab
from rnnlab.serve.engine import Engine, Job

TOK = rnnlab.ByteTokenizer()


def _model(layout="gated_deltanet,gla"):
    torch.manual_seed(0)
    return rnnlab.build_model(layout=layout, n_layers=2, d_model=16).eval()


def _alone(model, prefix, prompt, n, temperature=0.0, seed=0):
    s = rnnlab.Stream(model)
    if prefix:
        s.feed(TOK(prefix))
    s.feed(TOK(prompt))
    g = torch.Generator().manual_seed(seed)
    return [int(t[0]) for t in s.sample(n, temperature, generator=g)]


def _job(model, prefix, prompt, n, results, temperature=0.0, seed=0, then=None):
    state = logits = None
    if prefix:  # a session: a state at its own position
        s = rnnlab.Stream(model)
        s.feed(TOK(prefix))
        state, logits = s.state, s.logits
    key = (prefix, prompt)

    def done(r):
        results[key] = r
        if then is not None:
            then()
    return Job(TOK.encode(prompt), state, logits, n, temperature, None, torch.Generator().manual_seed(seed), [],
               on_text=lambda _t: None, on_done=done)


def _rows_per_step(model):
    rows = []
    model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    return rows


def test_jobs_decoded_together_equal_each_alone():
    model = _model()
    rows = _rows_per_step(model)
    results, finished = {}, threading.Event()
    engine = Engine(model, TOK.decode, eos_id=None, max_batch=8)
    late = _job(model, "", "joins later", 6, results, then=finished.set)
    specs = [("", "short", 20, 0.0, 0), ("a much longer system prompt. ", "q", 9, 0.0, 0),
             ("", "a prompt of another length", 3, 0.0, 0), ("ctx ", "sampled", 12, 0.8, 5)]
    jobs = [_job(model, p, q, n, results, t, s) for p, q, n, t, s in specs]
    jobs[2].on_done = lambda r, done=jobs[2].on_done: (done(r), engine.submit(late))  # joins mid-run
    for j in jobs:
        engine.submit(j)
    engine.start()
    assert finished.wait(60)
    engine.stop()
    assert len(results) == 5
    for p, q, n, t, s in specs + [("", "joins later", 6, 0.0, 0)]:
        r = results[(p, q)]
        assert r.finish_reason == "length" and r.completion_tokens == n
        assert r.text == TOK.decode(_alone(model, p, q, n, t, s)), (p, q)
        assert r.state.seen.tolist() == [len(p) + len(q) + n]
    assert rows[0] == 4 and max(rows) == 4 and 2 in rows  # four rows together; the late job beside the first


def test_a_finished_state_continues_like_a_stream():
    model = _model()
    results, finished = {}, threading.Event()
    engine = Engine(model, TOK.decode, eos_id=None, max_batch=4)
    engine.start()
    engine.submit(_job(model, "", "first turn", 5, results, then=finished.set))
    assert finished.wait(60)
    r = results[("", "first turn")]
    finished.clear()
    engine.submit(Job(TOK.encode(" second"), r.state, r.logits, 6, 0.0, None, torch.Generator(), [],
                      on_text=lambda _t: None, on_done=lambda x: (results.update(second=x), finished.set())))
    assert finished.wait(60)
    engine.stop()
    s = rnnlab.Stream(model)
    s.feed(TOK("first turn"))
    list(s.sample(5, 0.0))
    s.feed(TOK(" second"))
    assert results["second"].text == TOK.decode([int(t[0]) for t in s.sample(6, 0.0)])


def test_models_with_attention_are_batched_too():
    """Attention's KV cache rows sit at their own positions: a hybrid's jobs share the batch."""
    model = _model("gated_deltanet,attention")
    rows = _rows_per_step(model)
    results, left = {}, threading.Semaphore(0)
    engine = Engine(model, TOK.decode, eos_id=None, max_batch=8)
    specs = [("", "one", 4), ("", "a longer prompt", 7), ("prefix! ", "x", 5)]
    for p, q, n in specs:
        engine.submit(_job(model, p, q, n, results, then=left.release))
    engine.start()
    for _ in specs:
        assert left.acquire(timeout=60)
    engine.stop()
    assert max(rows) > 1
    for p, q, n in specs:
        assert results[(p, q)].text == TOK.decode(_alone(model, p, q, n))


@pytest.mark.parametrize("compile_step", [False, True])
def test_concurrent_http_requests_equal_each_alone(make_client, model_dir, compile_step):
    """... with the decode step eager or compiled (batches of changing size: one recompile, the
    batch dimension dynamic afterwards)."""
    torch._dynamo.reset()
    c = make_client(compile_step=compile_step)
    model = rnnlab.load_model(model_dir).eval()
    prompts = {"a": 11, "a longer prompt here": 4, "mid length": 8, "z": 15}
    out = {}

    def ask(prompt, n):
        out[prompt] = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}).json()

    threads = [threading.Thread(target=ask, args=kv) for kv in prompts.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for prompt, n in prompts.items():
        assert out[prompt]["choices"][0]["text"] == TOK.decode(_alone(model, "", prompt, n)), prompt


def test_streamed_text_holds_back_what_may_become_a_stop_string():
    job = Job([], None, None, 1, 0.0, None, torch.Generator(), ["world", "!?"], lambda _t: None, lambda _r: None)
    assert job.safe("hello wor") == len("hello ")
    assert job.safe("hello!") == len("hello")
    assert job.safe("hello a\ufffd") == len("hello a")  # an unfinished character waits too
    assert job.safe("plain") == 5
    job.ids = TOK.encode("say hello world and more")
    assert job.text(TOK.decode) == ("say hello ", True)


def test_a_failing_job_leaves_the_running_batch_alone():
    model = _model()
    results, left = {}, threading.Semaphore(0)
    engine = Engine(model, TOK.decode, eos_id=None, max_batch=4)
    good = _job(model, "", "steady", 12, results, then=left.release)
    bad = _job(model, "", "bad", 3, results, then=left.release)
    bad.prompt = [10 ** 6]  # a token outside the model's vocabulary
    good.on_text = lambda _t, first=[True]: (engine.submit(bad) if first[0] else None, first.__setitem__(0, False))
    engine.submit(good)
    engine.start()
    assert left.acquire(timeout=60) and left.acquire(timeout=60)
    engine.stop()
    assert results[("", "bad")].finish_reason == "error" and "token ids" in results[("", "bad")].error
    assert results[("", "steady")].text == TOK.decode(_alone(model, "", "steady", 12))
