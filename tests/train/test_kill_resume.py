"""Exact resume proven with real kills: a training process is SIGKILLed at random moments and
while it writes checkpoints (and stopped once with Ctrl-C, which saves), resumed each time with --resume, and ends with the weights of an
uninterrupted run, bit for bit, and a metrics.jsonl that holds each step once."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import rnnlab

pytestmark = pytest.mark.slow

STEPS = 120


def _args(text, out):
    return ["train", "--layout", "gated_deltanet,swa(window=8)", "--n-layers", "2", "--d-model", "32",
            "--seq-len", "32", "--batch-size", "4", "--steps", str(STEPS), "--save-every", "2", "--keep-last", "2",
            "--eval-every", "0", "--warmup", "2", "--data", text, "--out", str(out)]


def _start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rnnlab", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _latest_step(out):
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip()[5:]) if latest.is_file() else -1


def _wait_training(out, proc, timeout=120):
    """Until this process has saved a checkpoint past the one it started from (so it is in the
    training loop, not starting up)."""
    start = max(_latest_step(out), 0)
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if _latest_step(out) > start:
            return
        time.sleep(0.01)


def _kill_while_saving(out, proc, timeout=120):
    """SIGKILL the moment a checkpoint's temporary directory appears. Returns True if it caught one."""
    ck = out / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if ck.is_dir() and any(p.name.startswith(".tmp-") and p.is_dir() for p in ck.iterdir()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog.\n" for i in range(600)))
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = _start(_args(str(text), ref))
    assert p.wait() == 0, p.stderr.read()

    rng = random.Random(0)
    p = _start(_args(str(text), run))
    kills, during_save = 0, 0
    for how in ("save", "random", "sigint", "save", "random", "save"):
        _wait_training(run, p)
        if p.poll() is not None:
            break
        if how == "save":
            during_save += _kill_while_saving(run, p)
        elif how == "sigint":  # Ctrl-C: the step finishes, a checkpoint is saved, exit status 130
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGINT)
            assert p.wait() == 130, p.stderr.read()
            last_logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last_logged:08d}"
        else:
            time.sleep(rng.uniform(0.0, 0.6))
            p.send_signal(signal.SIGKILL)
            p.wait()
        kills += 1
        p = _start(_args(str(text), run) + ["--resume"])
    assert p.wait() == 0, p.stderr.read()
    assert kills >= 3 and during_save >= 1, (kills, during_save)

    a, b = rnnlab.load_model(ref), rnnlab.load_model(run)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert not list((run / "checkpoints").glob(".tmp-*"))
