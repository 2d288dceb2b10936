"""The Triton kernels of context_reweight (kernels/context_reweight.py) against the float64 oracle,
forward and all gradients. Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py)
on small shapes with one program per sample (every interpreted program costs milliseconds)."""

import os

import pytest
import torch
from test_context_reweight import _force, check_backend, cu_of, forward_and_grads, make

from sam_fast.ops import context_reweight

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU and TRITON_INTERPRET is not 1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton(monkeypatch):
    _force(monkeypatch, "triton", torch.zeros(1, 1, 1, device=DEVICE))


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ragged_batch(monkeypatch, dtype, mode):
    """Samples of 1, 4 and 2 images, P not a multiple of anything, D not a power of two."""
    _triton(monkeypatch)
    check_backend("triton", [1, 4, 2], 9, 24, dtype, mode, scale=3.0, bias=0.5, device=DEVICE)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_seventeen_images_and_large_scores(monkeypatch, mode):
    _triton(monkeypatch)
    check_backend("triton", [17], 3, 16, torch.float32, mode, scale=1e4, seed=3, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_scores_half(monkeypatch, dtype):
    _triton(monkeypatch)
    for mode in ("leave_one_out", "shared"):
        check_backend("triton", [3, 2], 5, 16, dtype, mode, scale=1e4, seed=4, device=DEVICE)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_dominating_image_and_non_contiguous(monkeypatch, mode):
    _triton(monkeypatch)
    layout = lambda F: F.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    fast = check_backend("triton", [4, 1], 5, 16, torch.float32, mode, scale=3.0, dominate=1e3, layout=layout,
                         device=DEVICE)
    if mode == "shared":
        assert fast[2].abs().max() < 1e-6 * fast[1].abs().max()


def test_backward_is_bitwise_deterministic_and_mean_guidance(monkeypatch):
    _triton(monkeypatch)
    F, w, b = (t.to(DEVICE) for t in make([3, 2], 5, 16, torch.float32, scale=3.0))
    cu = cu_of([3, 2]).to(DEVICE)
    g = torch.randn(5, 5, 16).to(DEVICE)
    fn = lambda F_, w_, b_: context_reweight(F_, w_, b_, cu, "leave_one_out")  # noqa: E731
    r1, r2 = (forward_and_grads(F, w, b, None, None, g, fn=fn) for _ in range(2))
    assert r1[0].device == F.device
    for x, y in zip(r1[:4], r2[:4]):
        assert torch.equal(x, y)
    Fg = F.clone().requires_grad_()
    out = context_reweight(Fg, None, None, cu, "leave_one_out")
    torch.testing.assert_close(out[0], (F[1] + F[2]) / 2)
    torch.testing.assert_close(out[3], F[4])
    (gF,) = torch.autograd.grad(out.sum(), Fg)
    torch.testing.assert_close(gF, torch.ones_like(F))


def test_opcheck_triton_op():
    from sam_fast.ops.context_reweight import _triton_fwd_op

    F, w, b = make([2, 1], 3, 16, torch.float32)
    args = (F.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_(), b.to(DEVICE).requires_grad_(),
            cu_of([2, 1]).to(DEVICE), False)
    torch.library.opcheck(_triton_fwd_op, args)
