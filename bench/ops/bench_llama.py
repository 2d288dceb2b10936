"""The frozen LLaMA's element-wise ops (sam_fast.ops.llama) against Hugging Face's modules,
forward + backward to the input (the LLM is frozen in SAM, so its weights get no gradient):

- ``rms_norm`` against ``LlamaRMSNorm`` on hidden [N=1500, 512];
- ``swiglu`` against LlamaMLP's activation ``act_fn(gate) * up`` on [N=1500, 1376].

The sizes are Vicuna-7B's proportions on the scaled config's LLM width (like
bench_linear_cross_entropy.py): hidden 4096 -> 512, intermediate 11008 -> 1376, 1500 tokens;
fp32 on CPU, bf16 on CUDA. Each op runs the backend the dispatcher picks (``triton`` on CUDA, the
lean ``torch`` autograd backend on CPU), recorded as ``backend``.

- ``speedup_vs_hf``: median per-round ratio of the two sides, alternating round by round after a
  warm-up round each (IQR in ``ratio_spread``);
- ``peak_mib`` / ``hf_peak_mib``: the peak of what torch allocates during one forward+backward
  (torch.cuda.max_memory_allocated on a GPU; on CPU the profiler's allocation events);
  ``memory_ratio`` = peak / HF's peak;
- ``saved_mib`` / ``hf_saved_mib``: what autograd keeps from the forward for the backward (per
  layer of a frozen LLM, this is what a training step holds until its backward reaches the layer).

With --benchmark-disable every benchmark is one forward+backward of the op (a smoke test).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from benchutil import (alternating_rounds, benchmarks_disabled, peak_allocated_bytes, record_ratio, record_sizes,
                       run_benchmark)
from sam_fast.ops import rms_norm, swiglu
from sam_fast.ops.llama import rms_norm_backend, swiglu_backend

N, H, I = 1500, 512, 1376  # tokens, LLM width, MLP width (Vicuna-7B: 4096, 11008)
EPS = 1e-6
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _hf_norm():
    """Hugging Face's LlamaRMSNorm, frozen, with non-trivial weights."""
    norm = LlamaRMSNorm(H, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, H))
    return norm.to(DEVICE, DTYPE).requires_grad_(False)


def _saved_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for the backward of `forward()` (parameters excluded)."""
    total = [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total[0]


def _record(benchmark, fused, plain, backend, fused_forward, plain_forward):
    """Time `fused` against `plain` (alternating rounds), measure both peaks and what each
    forward saves for its backward, store the figures."""
    rr = alternating_rounds(benchmark, fused, plain)
    record_ratio(benchmark, "speedup_vs_hf", rr)
    p_fused, p_plain = peak_allocated_bytes(fused), peak_allocated_bytes(plain)
    mib = 2.0**20
    info = dict(speedup_vs_hf=rr.ratio, fused_ms=rr.fast_median_s * 1e3, hf_ms=rr.other_median_s * 1e3,
                peak_mib=p_fused / mib, hf_peak_mib=p_plain / mib, memory_ratio=p_fused / max(1, p_plain),
                saved_mib=_saved_bytes(fused_forward) / mib, hf_saved_mib=_saved_bytes(plain_forward) / mib)
    benchmark.extra_info.update({k: round(v, 3) for k, v in info.items()})
    benchmark.extra_info["backend"] = backend
    print(" ".join(f"{k}={v:.3g}" for k, v in info.items()), f"backend={backend}")


def bench_rms_norm(benchmark):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    grad = torch.randn(N, H, generator=g).to(DEVICE, DTYPE)
    norm = _hf_norm()
    record_sizes(benchmark, dtype=DTYPE, hidden=x.shape, weight=norm.weight.shape)

    def fused():
        rms_norm(x, norm.weight, EPS).backward(grad)
        x.grad = None

    def hf():
        norm(x).backward(grad)
        x.grad = None

    if benchmarks_disabled(benchmark):
        run_benchmark(benchmark, fused)
        return
    with torch.no_grad():  # the same result before timing anything
        a, b = rms_norm(x, norm.weight, EPS), norm(x)
    assert torch.allclose(a.float(), b.float(), rtol=1e-2 if DTYPE != torch.float32 else 1e-5, atol=1e-5)
    _record(benchmark, fused, hf, rms_norm_backend(DEVICE, DTYPE, hidden_size=H)[0],
            lambda: rms_norm(x, norm.weight, EPS), lambda: norm(x))


def bench_swiglu(benchmark):
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(N, I, generator=g).to(DEVICE, DTYPE).requires_grad_()
    up = torch.randn(N, I, generator=g).to(DEVICE, DTYPE).requires_grad_()
    grad = torch.randn(N, I, generator=g).to(DEVICE, DTYPE)
    act = torch.nn.SiLU()  # LlamaMLP's act_fn for hidden_act="silu"
    record_sizes(benchmark, dtype=DTYPE, gate=gate.shape, up=up.shape)

    def fused():
        swiglu(gate, up).backward(grad)
        gate.grad = up.grad = None

    def hf():
        (act(gate) * up).backward(grad)
        gate.grad = up.grad = None

    if benchmarks_disabled(benchmark):
        run_benchmark(benchmark, fused)
        return
    with torch.no_grad():
        a, b = swiglu(gate, up), act(gate) * up
    assert torch.allclose(a.float(), b.float(), rtol=1e-2 if DTYPE != torch.float32 else 1e-5, atol=1e-5)
    _record(benchmark, fused, hf, swiglu_backend(DEVICE, DTYPE)[0], lambda: swiglu(gate, up), lambda: act(gate) * up)
