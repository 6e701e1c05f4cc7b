"""``rnnlab bench serve``: a real server under concurrent clients, and a crash in the middle of traffic.

Load (default): for each model layout (default: a recurrent ``gated_deltanet*2,gla*2`` and a
Transformer ``attention`` of the same size, ``--n-layers`` x ``--d-model``, random weights saved
to a temporary directory; or ``--model DIR``, a trained model), a real ``rnnlab serve`` process
is started on 127.0.0.1 (:class:`rnnlab.serve.launch.ServerProcess`) and ``--clients`` threads
each send ``--requests`` completions (a random prompt of ``--prompt-tokens`` bytes,
``--max-tokens`` tokens, temperature 0) one after another. The table shows requests/s and
completion tokens/s over the whole run and the p50 / p99 latency of a request; the server is
stopped after each layout (SIGTERM, then SIGKILL), whatever happens.

``--crash``: :func:`crash_check` on a tiny recurrent model (or ``--model``): ``--clients``
sessions take turns from threads, the server is killed with SIGKILL in the middle of them and
restarted on the same sessions directory; every session that completed a turn must be there with
the tokens the client counted and continue exactly as a fork made right after that turn did.

Prints a table, writes JSON (default ``runs/bench/serve.json``) and ends with one JSON line.

``rnnlab bench serve [--clients 8] [--requests 8] [--layouts ...] [--model DIR] [--quick] [--crash]``
"""
from __future__ import annotations

import itertools
import math
import random
import string
import tempfile
import threading
import time
from pathlib import Path

from . import report
from ..configs import Parser, int_at_least

__all__ = ["main", "build_parser", "load_run", "crash_check"]

DEFAULT_LAYOUTS = ("gated_deltanet*2,gla*2", "attention")
CRASH_LAYOUT = "gated_deltanet,gla"  # the tiny model of --crash: recurrent, so its sessions batch together


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="serve this trained model (a run or model directory) instead of random ones")
    p.add_argument("--layouts", nargs="+", help="model layouts with random weights (default: " +
                                               "; ".join(DEFAULT_LAYOUTS) + ")")
    p.add_argument("--n-layers", type=int_at_least(1), default=4, help="layers of each model")
    p.add_argument("--d-model", type=int_at_least(1), default=256, help="model width")
    p.add_argument("--clients", type=int_at_least(1), default=8, help="concurrent clients")
    p.add_argument("--requests", type=int_at_least(1), default=8, help="requests sent by each client, one at a time")
    p.add_argument("--prompt-tokens", type=int_at_least(1), default=64, help="bytes of each random prompt")
    p.add_argument("--max-tokens", type=int_at_least(1), default=32, help="max_tokens of each request")
    p.add_argument("--crash", action="store_true", help="the crash check instead of the load: --clients sessions "
                                                        "take turns of --max-tokens, the server is killed with "
                                                        "SIGKILL among them and restarted, every session is checked")
    p.add_argument("--compile-step", action="store_true", help="load: the servers decode with their step "
                                                               "compiled (rnnlab serve --compile-step)")
    p.add_argument("--quick", action="store_true", help="smoke run: d_model 32, 2 clients x 2 requests, 4 tokens")
    p.add_argument("--json", help="results file (default: runs/bench/serve.json)")
    return p


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def load_run(url: str, clients: int, requests: int, prompt_tokens: int, max_tokens: int, seed: int = 0) -> dict:
    """Drive the server at ``url`` with ``clients`` threads sending ``requests`` completions each;
    requests/s, completion tokens/s, latency percentiles (seconds) and the number of failed requests."""
    import httpx
    latencies: list[float] = []
    tokens, failures = [0], []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=600.0) as http:
            for _ in range(requests):
                prompt = "".join(rng.choices(string.ascii_letters + string.digits + " ", k=prompt_tokens))
                t0 = time.perf_counter()
                r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                elapsed = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(latencies), "failed": len(failures), "first_failure": failures[0] if failures else None,
            "seconds": wall, "requests_per_s": len(latencies) / wall, "completion_tokens_per_s": tokens[0] / wall,
            "p50_s": _percentile(latencies, 50) if latencies else None,
            "p99_s": _percentile(latencies, 99) if latencies else None}


def _random_model(directory: Path, layout: str, n_layers: int, d_model: int) -> Path:
    """A model of ``layout`` with seeded random weights, saved in ``directory``."""
    import torch

    from .. import build_model
    torch.manual_seed(0)
    build_model(layout=layout, n_layers=n_layers, d_model=d_model).save_pretrained(directory)
    return directory


def crash_check(model_dir: str | Path, workdir: str | Path, sessions: int = 4, kill_after: int = 6,
                max_tokens: int = 6, timeout: float = 45.0) -> dict:
    """Kill a server with SIGKILL in the middle of session turns and check the sessions after a restart.

    ``sessions`` threads each take turns on their own session. After each completed turn the
    client records the session's token count and forks the session twice: the first fork keeps
    the state as it was (a snapshot), the second is asked for a greedy continuation. Once
    ``kill_after`` turns have completed, the server is killed while other requests are in flight,
    and a new server is started on the same sessions directory (``workdir``/sessions). Every
    session that completed a turn is then checked against its last snapshot: it must have the
    token count the client recorded, and continue exactly as the fork did (``exact``); or, when the
    kill came after the server stored a turn but before the client recorded it (``answer_lost``),
    it must equal its snapshot after that turn is replayed on it. Every state file
    left in the directory must load. Returns the counts and the list of ``problems`` (empty when
    everything held)."""
    import httpx

    from ..inference.state_io import load_state
    from ..models.lm import is_temp, load_model
    from ..serve.launch import ServerProcess
    sessions_dir = Path(workdir) / "sessions"
    follow = {"prompt": " and so", "max_tokens": max_tokens, "temperature": 0}
    record: dict[str, dict] = {}  # session id -> tokens seen, snapshot fork, its continuation, the turn in flight
    problems: list[str] = []
    completed, enough, killed = [0], threading.Event(), threading.Event()
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def turns(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            def post(path: str, body: dict) -> dict:
                r = http.post(path, json=body)
                r.raise_for_status()
                return r.json()
            try:
                made = post("/v1/sessions", {"prefix": f"conversation {i}: "})
                sid, seen = made["id"], made["tokens_seen"]
                for k in itertools.count():
                    if killed.is_set() or time.monotonic() > deadline:
                        return
                    prompt = f" turn {k} of {i}"
                    with lock:
                        if sid in record:
                            record[sid]["in_flight"] = prompt
                    seen += post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                     "session": sid})["usage"]["total_tokens"]
                    snapshot = post("/v1/sessions", {"fork": sid})["id"]
                    probe = post("/v1/sessions", {"fork": snapshot})["id"]
                    text = post("/v1/completions", {**follow, "session": probe})["choices"][0]["text"]
                    with lock:
                        record[sid] = {"seen": seen, "snapshot": snapshot, "continuation": text, "in_flight": None}
                        completed[0] += 1
                        if completed[0] >= kill_after:
                            enough.set()
            except httpx.TransportError:
                return  # the server went away under this client
            except httpx.HTTPStatusError as e:
                if not killed.is_set():
                    problems.append(f"client {i}: {e.response.status_code} {e.response.text[:200]}")

    threads: list[threading.Thread] = []
    try:
        with ServerProcess(model_dir, sessions_dir) as first:
            threads = [threading.Thread(target=turns, args=(i, first.url)) for i in range(sessions)]
            for t in threads:
                t.start()
            if not enough.wait(timeout):
                problems.append(f"only {completed[0]} turns completed in {timeout:.0f} s")
            killed.set()
            first.kill()  # in the middle of the other sessions' requests
    finally:
        killed.set()
        for t in threads:
            t.join()
    exact = answer_lost = 0
    with ServerProcess(model_dir, sessions_dir) as second, httpx.Client(base_url=second.url, timeout=timeout) as http:
        def seen_by(sid: str) -> int | None:
            r = http.get(f"/v1/sessions/{sid}")
            return r.json()["tokens_seen"] if r.status_code == 200 else None

        def continuation(sid: str) -> str:
            return http.post("/v1/completions", json={**follow, "session": sid}).json()["choices"][0]["text"]

        def replayed(rec: dict) -> int | None:
            """The snapshot's token count after the turn that was in flight is replayed on it."""
            http.post("/v1/completions", json={"prompt": rec["in_flight"], "max_tokens": max_tokens,
                                               "temperature": 0, "session": rec["snapshot"]})
            return seen_by(rec["snapshot"])

        for sid, rec in record.items():
            seen = seen_by(sid)
            if seen is None:
                problems.append(f"session {sid}: gone after the restart")
                continue
            if seen == rec["seen"]:
                exact += 1
                expected = rec["continuation"]
            elif rec["in_flight"] is not None and replayed(rec) == seen:  # stored, but the answer was lost
                answer_lost += 1
                expected = continuation(rec["snapshot"])
            else:
                problems.append(f"session {sid}: {seen} tokens after the restart, the client counted {rec['seen']}")
                continue
            if (got := continuation(sid)) != expected:
                problems.append(f"session {sid}: continues with {got!r}, its fork did with {expected!r}")
    model = load_model(model_dir)
    files = [p for p in sessions_dir.iterdir() if not is_temp(p)]
    for path in files:
        try:
            load_state(path, model)
        except Exception as e:  # noqa: BLE001  (any failure to load is a torn file)
            problems.append(f"{path.name}: does not load ({type(e).__name__}: {e})")
    return {"turns_completed": completed[0], "sessions_checked": exact + answer_lost, "exact": exact,
            "answer_lost": answer_lost, "files": len(files),
            "temp_files": len(list(sessions_dir.iterdir())) - len(files), "problems": problems}


def _crash_main(a) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rnnlab-bench-serve-") as tmp:
        model_dir = a.model or _random_model(Path(tmp) / "model", CRASH_LAYOUT, 2, 16 if a.quick else 32)
        row = {"model": str(a.model or CRASH_LAYOUT),
               **crash_check(model_dir, tmp, sessions=a.clients, max_tokens=a.max_tokens)}
    print(f"{'model':30} {'turns':>6} {'checked':>8} {'exact':>6} {'lost answers':>13} {'files':>6} | problems")
    print(f"{row['model'][:30]:30} {row['turns_completed']:6d} {row['sessions_checked']:8d} {row['exact']:6d} "
          f"{row['answer_lost']:13d} {row['files']:6d} | {len(row['problems'])}")
    for problem in row["problems"]:
        print(f"  {problem}")
    return [row]


def main(argv: list[str] | None = None) -> list[dict]:
    from ..models.lm import LMConfig
    from ..serve.launch import ServerProcess
    a = build_parser().parse_args(argv)
    if a.model is not None and a.layouts:
        raise ValueError("--layouts: give --model or --layouts, not both")
    if a.model is not None and not Path(a.model).is_dir():
        raise ValueError(f"--model {a.model}: not a directory (expected a run or saved model directory)")
    json_path = a.json or "runs/bench/serve.json"
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.d_model, a.clients, a.requests, a.max_tokens = 32, 2, 2, 4
    if a.crash:
        rows = _crash_main(a)
        report("serve", rows, json_path, mode="crash", sessions=a.clients, max_tokens=a.max_tokens)
        return rows
    layouts = [None] if a.model else (a.layouts or list(DEFAULT_LAYOUTS))
    for lay in filter(None, layouts):  # names and options checked before any server starts
        LMConfig(layout=lay, n_layers=a.n_layers, d_model=a.d_model)
    print(f"rnnlab bench serve: {a.clients} clients x {a.requests} requests, prompts of {a.prompt_tokens} bytes, "
          f"{a.max_tokens} tokens each, temperature 0" +
          ("" if a.model else f", {a.n_layers} layers, d_model {a.d_model}, random weights"))
    print(f"{'model':44} {'requests/s':>11} {'tokens/s':>10} {'p50 s':>8} {'p99 s':>8} {'failed':>7}")
    rows: list[dict] = []
    for lay in layouts:
        with tempfile.TemporaryDirectory(prefix="rnnlab-bench-serve-") as tmp:
            model_dir = a.model or _random_model(Path(tmp) / "model", lay, a.n_layers, a.d_model)
            limits = ("--max-concurrent", str(max(32, a.clients + 1)), "--max-tokens", str(max(1024, a.max_tokens)),
                      "--max-prompt-tokens", str(max(8192, a.prompt_tokens)))  # the server's limits: never reached
            flags = limits + (("--compile-step",) if a.compile_step else ())
            with ServerProcess(model_dir, Path(tmp) / "sessions", *flags) as server:
                # warm-up, with every client when the step compiles (each new batch size may recompile)
                load_run(server.url, a.clients if a.compile_step else 1, 1, a.prompt_tokens, a.max_tokens)
                row = {"model": str(a.model or lay) + (" +compile-step" if a.compile_step else ""),
                       **load_run(server.url, a.clients, a.requests, a.prompt_tokens, a.max_tokens)}
        rows.append(row)
        p50, p99 = (f"{row[k]:8.3f}" if row[k] is not None else f"{'-':>8}" for k in ("p50_s", "p99_s"))
        print(f"{row['model'][:44]:44} {row['requests_per_s']:11.2f} {row['completion_tokens_per_s']:10.1f} "
              f"{p50} {p99} {row['failed']:7d}", flush=True)
        if row["first_failure"]:
            print(f"  first failure: {row['first_failure']}")
    report("serve", rows, json_path, mode="load", clients=a.clients, requests=a.requests,
           prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens, d_model=None if a.model else a.d_model,
           n_layers=None if a.model else a.n_layers)
    return rows
