"""The LM loss without full logits (sam_fast.ops.linear_cross_entropy) against the usual form
``F.cross_entropy(lm_head(h).float(), targets)``, loss plus backward to the hidden states (the
lm_head is frozen, as in SAM), on hidden [N=1500, 512] (the scaled config's LLM width) and a
vocabulary of 4000 (the scaled config) and 32000 (Vicuna's); fp32 on CPU, bf16 on CUDA.

- ``speedup_vs_full_logits``: median per-round ratio of the two sides, alternating round by round
  after a warm-up round each (IQR in ``ratio_spread``);
- ``peak_mib`` / ``full_peak_mib``: the peak of what torch allocates during one loss+backward
  (torch.cuda.max_memory_allocated on a GPU; on CPU the profiler's allocation events), next to
  ``logits_mib``, the size of the [N, V] fp32 logits; ``memory_ratio`` = peak / full peak;
- the ``supervised=0.4`` case hands in the same 1500 rows with 60% of the targets -100 (visual and
  instruction positions): the fused op drops them before the matmul, the full form does not.

With --benchmark-disable every benchmark is one call of the fused op (a smoke test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchutil import (alternating_rounds, benchmarks_disabled, peak_allocated_bytes, record_ratio, record_sizes,
                       run_benchmark)
from sam_fast.ops import linear_cross_entropy, linear_cross_entropy_backend

N, H = 1500, 512
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def inputs(vocab, supervised, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    lm_head = torch.nn.Linear(H, vocab, bias=False).to(DEVICE, DTYPE).requires_grad_(False)
    t = torch.randint(0, vocab, (N,), generator=g)
    t[torch.rand(N, generator=g) >= supervised] = -100
    return h, lm_head, t.to(DEVICE)


@pytest.mark.parametrize("vocab, supervised", [(4000, 1.0), (32000, 1.0), (32000, 0.4)])
def bench_linear_cross_entropy(benchmark, vocab, supervised):
    h, lm_head, t = inputs(vocab, supervised)
    record_sizes(benchmark, dtype=DTYPE, hidden=h.shape, lm_head=lm_head.weight.shape, vocab=vocab,
                 supervised_rows=int((t != -100).sum()))

    def fused():
        linear_cross_entropy(h, lm_head.weight, t).backward()
        h.grad = None

    def full():
        F.cross_entropy(lm_head(h).float(), t).backward()
        h.grad = None

    if benchmarks_disabled(benchmark):
        run_benchmark(benchmark, fused)
        return
    with torch.no_grad():  # same loss before timing anything
        a, b = linear_cross_entropy(h, lm_head.weight, t), F.cross_entropy(lm_head(h).float(), t)
    assert torch.allclose(a, b, rtol=1e-3 if DTYPE != torch.float32 else 1e-5), (a.item(), b.item())
    rr = alternating_rounds(benchmark, fused, full, rounds=3 if vocab > 8000 else 5)
    record_ratio(benchmark, "speedup_vs_full_logits", rr)
    p_fused, p_full = peak_allocated_bytes(fused), peak_allocated_bytes(full)
    mib = 2.0**20
    info = dict(speedup_vs_full_logits=rr.ratio, fused_ms=rr.fast_median_s * 1e3, full_ms=rr.other_median_s * 1e3,
                peak_mib=p_fused / mib, full_peak_mib=p_full / mib, memory_ratio=p_fused / max(1, p_full),
                logits_mib=N * vocab * 4 / mib)
    benchmark.extra_info.update({k: round(v, 3) for k, v in info.items()})
    benchmark.extra_info["backend"] = linear_cross_entropy_backend(DEVICE, DTYPE)[0]
    print(" ".join(f"{k}={v:.3g}" for k, v in info.items()))
