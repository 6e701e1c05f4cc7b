"""Multi-process training: two CPU processes under torchrun (gloo) reach the weights of one process
trained on the same global batch, with DDP and with FSDP2, and a run resumes under another world size."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import rnnlab

pytestmark = pytest.mark.slow


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(text, out, steps, *extra):
    return ["train", "--layout", "gated_deltanet,attention", "--n-layers", "2", "--d-model", "32", "--seq-len", "32",
            "--batch-size", "8", "--grad-accum", "2", "--steps", str(steps), "--warmup", "2", "--eval-every", "0",
            "--save-every", "3", "--data", text, "--out", str(out), *extra]


def _run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "rnnlab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_port()), "-m", "rnnlab", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _max_diff(a, b):
    ma, mb = rnnlab.load_model(a), rnnlab.load_model(b)
    return max((v - mb.state_dict()[k]).abs().max().item() for k, v in ma.state_dict().items())


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "text.txt"
    f.write_text("".join(f"{i}: pack my box with {i % 17} dozen liquor jugs.\n" for i in range(800)))
    return str(f)


@pytest.fixture(scope="module")
def single(text, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _run(_args(text, out, 6))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(text, single, tmp_path, parallel):
    out = tmp_path / "two"
    _run(_args(text, out, 6, "--parallel", parallel), nproc=2)
    assert _max_diff(single, out) < 1e-5


def test_resume_under_another_world_size(text, single, tmp_path):
    out = tmp_path / "mixed"
    _run(_args(text, out, 3), nproc=2)
    _run(_args(text, out, 6) + ["--resume"], nproc=1)
    assert _max_diff(single, out) < 1e-5
