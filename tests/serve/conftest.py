"""A tiny recurrent model saved once, and clients of servers over it."""
import pytest
import torch

import rnnlab

LAYOUT = "gated_deltanet,gla"  # recurrent only: rows of a batch at different positions


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=LAYOUT, n_layers=2, d_model=16)
    d = tmp_path_factory.mktemp("served") / "tiny"
    model.save_pretrained(d)
    return d


@pytest.fixture
def make_client(model_dir, tmp_path):
    """``make_client(**ServeConfig fields)`` -> a started TestClient (sessions in tmp_path by default)."""
    from fastapi.testclient import TestClient

    from rnnlab.serve import ServeConfig, create_app
    clients = []

    def make(model=None, **fields):
        fields.setdefault("sessions_dir", str(tmp_path / "sessions"))
        client = TestClient(create_app(model or model_dir, ServeConfig(**fields)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def no_server_left(tmp_path):
    """Checks, after the test, that no process started by it is still running: none whose command
    line names the test's temporary directory (Linux: /proc)."""
    from pathlib import Path
    yield
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path).encode() in cmdline.read_bytes():
                left.append(int(cmdline.parent.name))
        except OSError:  # the process has just exited
            pass
    assert left == [], f"processes left running: {left}"


@pytest.fixture
def live_server(model_dir, tmp_path, no_server_left):
    """``live_server(*flags, sessions_dir=...)`` -> a started :class:`ServerProcess` (a real ``rnnlab
    serve`` on 127.0.0.1); every one is stopped at the end of the test."""
    from rnnlab.serve.launch import ServerProcess
    servers = []

    def start(*flags, sessions_dir=None):
        server = ServerProcess(model_dir, sessions_dir or tmp_path / "sessions", *flags)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
