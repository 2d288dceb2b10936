"""linear_cross_entropy (lm_head fused with the cross-entropy) on every backend (``chunked``,
``reference``: full logits; ``liger``: liger-kernel, CUDA only, in `test_cuda_backends_within_budget`)
against one float64 oracle, forward loss and the gradients w.r.t. hidden, weight and bias, within
one error-budget table; the memory contract (no full logits), chunk sizes, the backend report and
bad inputs."""

from __future__ import annotations

import importlib
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _budget import Budget

from sam_fast.ops import linear_cross_entropy, linear_cross_entropy_backend, linear_cross_entropy_ref
from sam_fast.ops.dispatch import ENV_VAR, dispatcher
from sam_fast.ops.linear_cross_entropy import default_chunk_size

# dtype -> error budget against the float64 oracle: `rule` is the 2x rule (error <= 2 x the error
# of `linear_cross_entropy_ref`, full logits in the same dtype, + floor x the quantity's largest
# magnitude); `close` the assert_close tolerances where there is no PyTorch side to compare with
BUDGET = {
    torch.float32: dict(rule=Budget(factor=2, floor=1e-6), close=dict(rtol=1e-5, atol=1e-6)),
    torch.float16: dict(rule=Budget(factor=2, floor=2.0**-11)),
    torch.bfloat16: dict(rule=Budget(factor=2, floor=2.0**-8)),
}
BACKENDS = ["chunked", "reference"]  # those that run CPU tensors; liger: test_cuda_backends_within_budget
IGNORE = -100


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each CPU backend forced (SAM_FAST_BACKEND), checked to be the one taken."""
    monkeypatch.setenv(ENV_VAR, request.param)
    h, w, t, _ = make(4, 8, 11, torch.float32)
    assert dispatcher("linear_cross_entropy").choose(h, w, t).name == request.param
    return request.param


def oracle(h, w, t, b, reduction):
    """The loss in float64, written out: log-softmax of h w^T + b, minus the target's entry,
    summed over the supervised rows (and divided by their number for "mean")."""
    logits = h.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    keep = t != IGNORE
    logp = logits[keep] - torch.logsumexp(logits[keep], dim=1, keepdim=True)
    loss = -logp.gather(1, t[keep].long()[:, None]).sum()
    return loss / keep.sum() if reduction == "mean" else loss


def make(M, H, V, dtype, ignore_frac=0.3, bias=False, seed=0, logit_std=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g)
    w = torch.randn(V, H, generator=g) * (logit_std / H**0.5)
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (M,), generator=g)
    t[torch.rand(M, generator=g) < ignore_frac] = IGNORE
    t[0] = 1  # at least one supervised row
    return h.to(dtype), w.to(dtype), t, (None if b is None else b.to(dtype))


def loss_and_grads(fn, h, w, t, b, reduction, need, grad_out=3.0, **kw):
    """(loss * grad_out, d hidden, d weight, d bias) with the inputs in `need` requiring grad
    (the others None)."""
    h = h.detach().requires_grad_("h" in need)
    w = w.detach().requires_grad_("w" in need)
    b = None if b is None else b.detach().requires_grad_("b" in need)
    loss = fn(h, w, t, b, reduction, **kw) * grad_out
    inputs = [x for x, k in ((h, "h"), (w, "w"), (b, "b")) if x is not None and k in need]
    grads = dict(zip([k for k in "hwb" if k in need and (k != "b" or b is not None)],
                     torch.autograd.grad(loss, inputs)))
    return loss.detach(), grads.get("h"), grads.get("w"), grads.get("b")


def check_budget(M, H, V, dtype, reduction, need, chunk_size, bias=False, seed=0, ignore_frac=0.3):
    h, w, t, b = make(M, H, V, dtype, ignore_frac=ignore_frac, bias=bias, seed=seed)
    exact = loss_and_grads(oracle, h.double(), w.double(), t, None if b is None else b.double(), reduction, need)
    plain = loss_and_grads(linear_cross_entropy_ref, h, w, t, b, reduction, need)
    fast = loss_and_grads(linear_cross_entropy, h, w, t, b, reduction, need, chunk_size=chunk_size)
    assert fast[0].dtype == torch.float32 and fast[0].shape == ()
    for i, name in enumerate(("loss", "d hidden", "d weight", "d bias")):
        if exact[i] is None:
            assert fast[i] is None, name
            continue
        assert fast[i].dtype == (torch.float32 if i == 0 else dtype), name
        assert fast[i].shape == exact[i].shape, name
        assert torch.isfinite(fast[i]).all(), name
        err = (fast[i].double() - exact[i]).abs().max().item()
        scale = exact[i].abs().max().item()
        budget = BUDGET[dtype]["rule"].allowed((plain[i].double() - exact[i]).abs().max().item(), scale)
        assert err <= budget, f"{dtype} {reduction} {name}: error {err:.3g} > budget {budget:.3g} (scale {scale:.3g})"
    return fast, exact


# M = 37 rows in chunks of 8 (not a multiple), V = 1009 (prime), ~30% rows ignored, loss * 3.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("need", ["h", "hw", "w"])
def test_loss_and_grads_within_budget(backend, dtype, reduction, need):
    fast, exact = check_budget(37, 24, 1009, dtype, reduction, need, chunk_size=8)
    if "h" in need:  # ignored rows get exactly zero gradient
        _, _, t, _ = make(37, 24, 1009, dtype)
        assert (fast[1][t == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gradient_within_budget(backend, dtype):
    check_budget(29, 16, 257, dtype, "mean", "hwb", chunk_size=5, bias=True, seed=3)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_chunk_sizes_and_no_ignored_rows(backend, chunk_size):
    # every row supervised (no row dropping), one chunk, one row per chunk, chunks past the end
    check_budget(50, 16, 311, torch.float32, "sum", "hw", chunk_size=chunk_size, ignore_frac=0.0, seed=1)


def test_mean_divides_by_supervised_count():
    h, w, t, _ = make(40, 8, 97, torch.float64, ignore_frac=0.5)
    n = int((t != IGNORE).sum())
    assert 0 < n < 40
    s = linear_cross_entropy(h, w, t, reduction="sum", chunk_size=6)
    m = linear_cross_entropy(h, w, t, reduction="mean", chunk_size=6)
    torch.testing.assert_close(m * n, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(m, F.cross_entropy((h @ w.t()), t), rtol=1e-12, atol=0)


def test_int32_targets_and_no_grad():
    h, w, t, _ = make(21, 8, 53, torch.float32)
    want = oracle(h, w, t, None, "mean")
    with torch.no_grad():
        got = linear_cross_entropy(h.requires_grad_(), w, t.int(), chunk_size=4)
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), want, **BUDGET[torch.float32]["close"])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_cross_entropy_ref])
def test_all_ignored_raises(fn, reduction):
    h, w, _, _ = make(5, 8, 11, torch.float32)
    t = torch.full((5,), IGNORE)
    with pytest.raises(ValueError, match="ignore_index=-100: there is nothing to supervise"):
        fn(h, w, t, reduction=reduction)
    with pytest.raises(ValueError, match="nothing to supervise"):
        fn(h[:0], w, t[:0], reduction=reduction)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, w, t: (h, w, torch.tensor([1, 2, 11, IGNORE, 0])), r"targets\[2\]=11 is outside \[0, 11\)"),
        (lambda h, w, t: (h, w, torch.tensor([1, -5, 3, IGNORE, 0])), r"targets\[1\]=-5 is outside"),
        (lambda h, w, t: (h, w, t.float()), "targets dtype"),
        (lambda h, w, t: (h, w, t[:4]), r"targets must be \[M\] with M=5"),
        (lambda h, w, t: (h[None], w, t), r"hidden must be a floating \[M, H\]"),
        (lambda h, w, t: (h, w[:, :7], t), r"weight must be \[V, H\] with H=8"),
        (lambda h, w, t: (h, w.double(), t), "weight dtype torch.float64 differs"),
    ],
)
def test_bad_input_raises_naming_the_value(mutate, match):
    h, w, t, _ = make(5, 8, 11, torch.float32)
    h, w, t = mutate(h, w, t)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, t)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_checked_targets_read_nothing_back(backend, reduction):
    """``checked_targets=True`` (the caller kept only supervised rows, as a pack plan does): the
    same loss and gradients, bit for bit, without the host read that counts and checks the
    targets; a target out of range is still refused (on the device), none at all from the shape."""
    from _host_reads import HostReads

    h, w, t, _ = make(23, 8, 37, torch.float32, ignore_frac=0.0)
    want = loss_and_grads(linear_cross_entropy, h, w, t, None, reduction, "hw", chunk_size=5)
    with HostReads() as reads:
        got = loss_and_grads(linear_cross_entropy, h, w, t, None, reduction, "hw", chunk_size=5,
                             checked_targets=True)
    assert reads.total == 0, reads.report()
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"a target is outside \[0, 37\)"):
        linear_cross_entropy(h, w, torch.cat([t[:-1], t.new_tensor([37])]), checked_targets=True)
    with pytest.raises(ValueError, match="no target to supervise"):
        linear_cross_entropy(h[:0], w, t[:0], checked_targets=True)


def test_bad_options_raise():
    h, w, t, _ = make(5, 8, 11, torch.float32)
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"bias must be \[11\]"):
        linear_cross_entropy(h, w, t, bias=torch.zeros(10))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns, and of the matmul outputs apart."""

    MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")

    def __init__(self):
        super().__init__()
        self.shapes, self.matmuls = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
                if func.overloadpacket.__name__ in self.MATMULS:
                    self.matmuls.append(tuple(o.shape))
        return out


def test_no_full_logits_and_no_logits_for_ignored_rows():
    M, H, V, chunk = 600, 8, 301, 32
    h, w, t, _ = make(M, H, V, torch.float32, ignore_frac=0.5)
    n_valid = int((t != IGNORE).sum())
    h.requires_grad_()
    with _Shapes() as rec:
        linear_cross_entropy(h, w, t, chunk_size=chunk).backward()
    biggest = max(torch.Size(s).numel() for s in rec.shapes)
    assert biggest <= chunk * V, f"a tensor of {biggest} elements > one chunk of logits ({chunk} x {V})"
    # logits are computed for the supervised rows only, each once, in chunks
    logit_shapes = [s for s in rec.matmuls if s[-1] == V]
    assert n_valid < M and sum(s[0] for s in logit_shapes) == n_valid
    assert len(logit_shapes) == -(-n_valid // chunk)
    assert not any(s == (M, V) for s in rec.shapes)
    # the detector does see the full logits of the reference
    with _Shapes() as rec_ref:
        linear_cross_entropy_ref(h, w, t).backward()
    assert (M, V) in rec_ref.shapes


def test_default_chunk_is_about_64_mib_of_fp32_logits():
    for V in (4000, 32000, 32001, 152064):
        c = default_chunk_size(V)
        assert 32 * 2**20 <= c * V * 4 <= 64 * 2**20
    assert default_chunk_size(10**9) == 1


def test_backend_report_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, reasons = linear_cross_entropy_backend("cpu", torch.float32)
    assert name == "chunked"
    assert reasons["chunked"] == "usable" and reasons["liger"] != "usable"
    from sam_fast import env

    assert "cpu: linear_cross_entropy backend chunked (not liger: " in env.report()


def test_forced_reference_backend_matches(monkeypatch):
    h, w, t, _ = make(19, 8, 37, torch.float64)
    want = linear_cross_entropy(h, w, t, chunk_size=4)
    monkeypatch.setenv(ENV_VAR, "reference")
    torch.testing.assert_close(linear_cross_entropy(h, w, t), want, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["liger", "chunked"])
def test_cuda_backends_within_budget(backend, dtype, reduction, monkeypatch):
    """Each backend that runs on CUDA, forced, against the float64 oracle (liger where installed)."""
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    monkeypatch.setenv(ENV_VAR, backend)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=g).to(dtype)
    w = (torch.randn(1009, 64, generator=g) * 0.4).to(dtype)
    t = torch.randint(0, 1009, (300,), generator=g)
    t[::4] = IGNORE
    exact = loss_and_grads(oracle, h.double(), w.double(), t, None, reduction, "h")
    plain = loss_and_grads(linear_cross_entropy_ref, h.cuda(), w.cuda(), t.cuda(), None, reduction, "h")
    fast = loss_and_grads(linear_cross_entropy, h.cuda(), w.cuda(), t.cuda(), None, reduction, "h")
    assert fast[0].dtype == torch.float32 and fast[1].dtype == dtype
    for i, name in enumerate(("loss", "d hidden")):
        err = (fast[i].double().cpu() - exact[i]).abs().max().item()
        scale = exact[i].abs().max().item()
        budget = BUDGET[dtype]["rule"].allowed((plain[i].double().cpu() - exact[i]).abs().max().item(), scale)
        assert err <= budget, f"{backend} {dtype} {reduction} {name}: error {err:.3g} > budget {budget:.3g}"


def test_liger_missing_or_too_old_is_reported(monkeypatch):
    """The liger backend is never taken on CPU, and an unusable liger_kernel says why."""
    lce = importlib.import_module("sam_fast.ops.linear_cross_entropy")  # (the package attribute is the function)

    monkeypatch.setattr(lce, "_LIGER", (None, "liger_kernel is not installed (test)"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    name, reasons = linear_cross_entropy_backend("cpu", torch.float32)
    assert name == "chunked" and reasons["liger"] == "liger_kernel is not installed (test)"
    monkeypatch.setattr(lce, "_LIGER", (lambda *a, **k: None, None))  # "installed": CPU is still refused
    assert "need CUDA tensors" in linear_cross_entropy_backend("cpu", torch.float32)[1]["liger"]


def test_torch_compile_smoke():
    """The op inside a compiled function (it runs eagerly there): same loss and gradient, also
    when the next batch supervises a different number of rows."""
    if os.environ.get("SAM_FAST_SKIP_COMPILE_TESTS"):
        pytest.skip("SAM_FAST_SKIP_COMPILE_TESTS is set")

    def step(h, w, t, b, reduction, chunk_size):
        return linear_cross_entropy(F.silu(h), w, t, b, reduction, chunk_size=chunk_size) * 2.0

    compiled = torch.compile(step)
    t0 = time.perf_counter()
    for seed in (0, 1):
        h, w, t, _ = make(23, 8, 41, torch.float32, seed=seed)
        want = loss_and_grads(step, h, w, t, None, "mean", "h", chunk_size=5)
        got = loss_and_grads(compiled, h, w, t, None, "mean", "h", chunk_size=5)
        if time.perf_counter() - t0 > 30:
            pytest.skip("torch.compile took over 30 s here")
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
