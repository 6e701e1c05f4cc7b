import os

import pytest
import torch
from hypothesis import settings

# Tests are many small ops: one thread per pytest worker is fastest on a 2-core machine.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

settings.register_profile("rnnlab", max_examples=8, deadline=None, derandomize=True)
settings.load_profile("rnnlab")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
