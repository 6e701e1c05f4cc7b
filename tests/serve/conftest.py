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
