"""context_reweight (public op, reference backend) against a float64 oracle written here."""

import pytest
import torch

from sam_fast.ops import context_reweight, context_reweight_ref


def oracle(F, w, b, counts, mode):
    """Direct formula in float64, image by image (no masking tricks)."""
    F = F.double()
    s = F @ w.double().reshape(-1) + (b.double().reshape(()) if b is not None else 0.0) if w is not None else F.new_zeros(F.shape[:2])
    out, start = [], 0
    for n in counts:
        idx = list(range(start, start + n))
        if mode == "shared":
            a = torch.softmax(s[idx], 0)
            out.append((a[..., None] * F[idx]).sum(0, keepdim=True))
        else:
            for i in idx:
                others = [m for m in idx if m != i]
                if not others:
                    out.append(F[i : i + 1] * 0)
                    continue
                a = torch.softmax(s[others], 0)
                out.append((a[..., None] * F[others]).sum(0, keepdim=True))
        start += n
    return torch.cat(out)


def cu_of(counts, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
@pytest.mark.parametrize("counts", [[1], [2], [1, 2, 3, 5], [17, 1, 4]])
def test_forward_and_grads_match_oracle(mode, counts):
    torch.manual_seed(0)
    T, P, D = sum(counts), 7, 24
    F = torch.randn(T, P, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)
    out = context_reweight(F, w, b, cu_of(counts), mode)
    ref = oracle(F, w, b, counts, mode)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (F, w, b), g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, (F, w, b), g, allow_unused=True, materialize_grads=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_one_image_sample_is_zero_in_leave_one_out_and_mean_is_uniform():
    F = torch.randn(4, 3, 8)
    out = context_reweight(F, None, None, cu_of([1, 3]), "leave_one_out")
    assert out[0].abs().max() == 0
    torch.testing.assert_close(out[1], (F[2] + F[3]) / 2)
    shared = context_reweight(F, None, None, cu_of([1, 3]), "shared")
    torch.testing.assert_close(shared[1], F[1:].mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_scores_are_stable(dtype):
    """Scores ~1e4: a naive exp overflows; error within 2x of torch's same-dtype softmax."""
    torch.manual_seed(1)
    counts, P, D = [3, 1, 4], 5, 16
    F = torch.randn(sum(counts), P, D).to(dtype)
    w = (torch.randn(D) * 3e3).to(dtype)
    b = torch.zeros((), dtype=dtype)
    for mode in ("leave_one_out", "shared"):
        ref = oracle(F, w, b, counts, mode)
        out = context_reweight(F, w, b, cu_of(counts), mode)
        assert out.dtype == dtype and torch.isfinite(out).all()
        plain = oracle(F.double(), w.double(), b.double(), counts, mode).to(dtype)  # torch rounding of the result
        budget = 2 * (plain.double() - ref).abs().max().item() + 1e-2 * (1 if dtype != torch.float32 else 1e-3)
        assert (out.double() - ref).abs().max().item() <= budget


def test_non_contiguous_and_int64_offsets():
    F = torch.randn(8, 6, 5).transpose(1, 2)  # [8, 5, 6] non-contiguous
    w = torch.randn(6)
    out = context_reweight(F, w, torch.zeros(1), cu_of([3, 5], torch.int64), "leave_one_out")
    torch.testing.assert_close(out.double(), oracle(F, w, torch.zeros(1), [3, 5], "leave_one_out"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=torch.randn(4, 3)), r"\[T, P, D\]"),
        (dict(weight=torch.randn(7)), "weight must be"),
        (dict(cu_images=torch.tensor([0, 2, 4], dtype=torch.float32)), "int32 or int64"),
        (dict(cu_images=torch.tensor([[0, 4]], dtype=torch.int32)), "1-D"),
        (dict(cu_images=torch.tensor([1, 4], dtype=torch.int32)), r"cu_images\[0\]=1"),
        (dict(cu_images=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "decreases at sample 1"),
        (dict(cu_images=torch.tensor([0, 3], dtype=torch.int32)), "must equal T=4"),
        (dict(cu_images=torch.tensor([0, 2, 2, 4], dtype=torch.int32)), "sample 1 is empty"),
        (dict(mode="both"), "mode='both'"),
        (dict(weight=torch.randn(8, device="meta")), "on meta"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(features=torch.randn(4, 3, 8), weight=torch.randn(8), bias=torch.zeros(()),
                cu_images=torch.tensor([0, 2, 4], dtype=torch.int32), mode="leave_one_out")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        context_reweight(**args)


def test_reference_is_what_dispatch_falls_back_to():
    F = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    cu = cu_of([2, 3])
    torch.testing.assert_close(context_reweight(F, w, None, cu), context_reweight_ref(F, w, None, cu))
