import pytest
import torch

from sam_fast.ops import cross_attention


def test_matches_float64_formula_forward_and_backward():
    torch.manual_seed(0)
    q = torch.randn(3, 4, 8, 16, requires_grad=True)
    k = torch.randn(3, 4, 11, 16, requires_grad=True)
    v = torch.randn(3, 4, 11, 16, requires_grad=True)
    bias = torch.zeros(3, 1, 1, 11)
    bias[1, ..., 7:] = torch.finfo(torch.float32).min
    out = cross_attention(q, k, v, bias)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / 4.0 + bias.double(), -1) @ vd
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (qd, kd, vd), g)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        cross_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="incompatible"):
        cross_attention(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
