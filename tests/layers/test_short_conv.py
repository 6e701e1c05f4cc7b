"""The short causal convolution on packed rows: each sequence sees only its own conv state and inputs."""
import pytest
import torch

from rnnlab.layers.common import ShortConv


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("lengths", [[4, 0, 5], [30, 1, 29]])  # short rows (the window sum) and long (conv2d)
def test_packed_equals_each_sequence_alone(width, lengths):
    torch.manual_seed(0)
    conv = ShortConv(3, width, bias=True).double()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = torch.randn(1, sum(lengths), 3, dtype=torch.float64)
    s0 = torch.randn(len(lengths), width - 1, 3, dtype=torch.float64)
    y, s = conv(x, s0, cu)
    assert s.shape == (len(lengths), width - 1, 3)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if b == a:  # an empty sequence keeps its conv state
            torch.testing.assert_close(s[n], s0[n])
            continue
        y_n, s_n = conv(x[:, a:b], s0[n:n + 1])
        torch.testing.assert_close(y[:, a:b], y_n)
        torch.testing.assert_close(s[n:n + 1], s_n)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_convolution_and_its_backward_equal_conv1d(width, bias):
    """The CPU form (channels-last conv2d with a written-out backward) against nn.Conv1d on the
    same weights: outputs and the gradients of input, conv state, weight and bias (float64)."""
    torch.manual_seed(0)
    conv = ShortConv(5, width, bias=bias, activation=False).double()
    x = torch.randn(2, 40, 5, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, width - 1, 5, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 40, 5, dtype=torch.float64)
    y, _ = conv(x, s0)
    grads = torch.autograd.grad(y, [x, s0, *conv.parameters()], gy)
    xp = torch.cat([s0, x], dim=1)
    y_ref = conv.conv(xp.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
    grads_ref = torch.autograd.grad(y_ref, [x, s0, *conv.parameters()], gy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
