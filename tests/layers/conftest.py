import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Token-by-token reference loops (and sequential RNN forms) are far faster on one thread here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
