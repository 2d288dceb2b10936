"""What sam_fast runs on: versions, devices, the compiled extension and each op's backend.

    python -m sam_fast.env        # or: sam-fast env

Every section is gathered on its own, so a broken piece (no transformers, a failing op import)
shows up as a line of the report instead of taking it down.
"""

from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (version unknown)")
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken
        return f"broken ({type(exc).__name__}: {exc})"


def _devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"CUDA available: no (torch CUDA build: {torch.version.cuda or 'none'})"]
    lines = [f"CUDA available: yes (torch CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return lines


def _extension() -> list[str]:
    from sam_fast import _ext

    i = _ext.info()
    status = "loaded" if _ext.load() is not None else f"not loaded: {i['error']}"
    where = i.get("built_torch_dir") or "-"
    if i.get("built_isolated"):
        where += f" (an isolated build environment: {i['built_isolated']})"
    lines = [
        f"extension sam_fast._C: {status}",
        f"  path: {i['path'] or '-'}",
        f"  built with torch: {i['built_with_torch'] or '-'} (matches running torch: {i['torch_matches']})",
        f"  torch it was compiled against: {where}",
        f"  CUDA op compiled in: {i['with_cuda']}",
    ]
    if i.get("fix"):
        lines.append(f"  to fix: {i['fix']}")
    return lines


def _ops() -> list[str]:
    from sam_fast.ops.dispatch import explain

    lines = []
    for op, entry in explain().items():
        lines.append(f"  {op}: {entry['backend']}")
        for backend, why in entry.get("reasons", {}).items():
            lines.append(f"    {backend}: {why}")
    return lines or ["  (no ops registered)"]


def _schedule() -> list[str]:
    """The W-stream schedule `SAM` chooses on each device here, per context mode: the answer of
    `choose_w_schedule` (the function the model calls when it is built or moved) for the paper's
    Q-former (`SAMConfig.instructblip_vicuna7b`'s heads; fp16 on CUDA, fp32 on CPU)."""
    import torch

    from sam_fast.config import CONTEXT_MODES, SAMConfig
    from sam_fast.modules.schedules import choose_w_schedule

    q = SAMConfig.instructblip_vicuna7b().qformer_config
    heads, head_dim = q.num_attention_heads, q.hidden_size // q.num_attention_heads
    devices = [("cpu", torch.float32)] + ([("cuda", torch.float16)] if torch.cuda.is_available() else [])
    lines = []
    for dev, dtype in devices:
        loo, shared = (choose_w_schedule(mode, heads, head_dim, dev, dtype) for mode in CONTEXT_MODES)
        lines.append(f"  {dev}: leave_one_out W-stream K/V {loo.summary} ({loo.__name__}); "
                     f"shared mode: {shared.summary} ({shared.__name__})")
    return lines


def _loss() -> list[str]:
    """Which backend the LM loss (linear_cross_entropy: lm_head fused with the cross-entropy, no
    full logits) takes on each device here, and why (bf16 on CUDA, fp32 on CPU)."""
    import torch

    from sam_fast.ops.linear_cross_entropy import linear_cross_entropy_backend

    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    lines = []
    for dev, dtype in devices:
        name, reasons = linear_cross_entropy_backend(dev, dtype)
        ahead = list(reasons)[: list(reasons).index(name)] if name in reasons else list(reasons)
        why = "; ".join(f"{k}: {reasons[k]}" for k in ahead)  # the preferred backends it could not take
        lines.append(f"  {dev}: linear_cross_entropy backend {name}" + (f" (not {why})" if why else ""))
    return lines


def _llama() -> list[str]:
    """What `sam_fast.models.llama_kernels.apply_fused_llama_kernels` would patch in a LLaMA on each
    device here (fp32 on CPU, bf16 on CUDA): fused RMSNorm / SwiGLU or why not; RoPE; liger-kernel."""
    import torch

    from sam_fast.models.llama_kernels import fused_llama_kernels_plan

    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    lines = []
    for dev, dtype in devices:
        plan = fused_llama_kernels_plan(dev, dtype)
        lines.append(f"  {dev}: {plan['summary']}")
    lines.append(f"  liger_kernel: {plan['liger_kernel']}")
    return lines


def _recompute() -> list[str]:
    """What ``recompute_qformer="auto"`` would choose on each device here for the Vicuna-7B config
    on the benchmarks' realistic batch (B = 8, 30 images; fp32 on CPU, bf16 on CUDA), and why."""
    import torch

    from sam_fast.bench_plan import realistic_shapes, recompute_choice
    from sam_fast.config import SAMConfig

    cfg, shapes = SAMConfig.instructblip_vicuna7b(), realistic_shapes(0)
    devices = [("cpu", 4)] + ([("cuda", 2)] if torch.cuda.is_available() else [])
    return [f"  {dev}: {recompute_choice(cfg, shapes, nbytes, dev)[1]}" for dev, nbytes in devices]


def _packing() -> list[str]:
    """Which attention the packed LLM step runs per device (fp32 on CPU, bf16 on CUDA; Vicuna-7B's
    head dim 128) and why: `sam_fast.models.packing.packing_backend`."""
    import torch

    from sam_fast.models.packing import packing_backend

    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    return [f"  {dev}: {name} ({why})" for dev, dtype in devices
            for name, why in [packing_backend(dev, dtype, head_dim=128)]]


def _generation() -> list[str]:
    """What the lavis decoder's ``compile_decode=True`` (generate keyword or
    ``generation_config.compile_decode``) does with the decoding step on each device here."""
    import torch

    from sam_fast.models.generation import decode_compile_kwargs

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for dev in devices:
        kw = decode_compile_kwargs(True, dev)
        how = (f"torch.compile({', '.join(f'{k}={v!r}' for k, v in kw.items())}) over a static KV cache"
               if kw else "eager over a preallocated KV cache (double-buffered beam reorder)")
        lines.append(f"  {dev}: compile_decode=True runs the decoding step {how}")
    return lines


def _capture() -> list[str]:
    """The capture modes of `SAM.compile_training_step` (the whole packed step as one graph) and
    what ``"reduce-overhead"`` (CUDA graphs) means here, with the default buckets."""
    import torch

    from sam_fast.models import static_step

    cuda = "CUDA graphs on CUDA" + ("" if torch.cuda.is_available() else "; no CUDA here")
    return [f"  modes: None (torch.compile's default; the default), \"reduce-overhead\" ({cuda}), "
            f"{', '.join(repr(m) for m in static_step.CAPTURE_MODES[2:] if m != 'reduce-overhead')}",
            f"  buckets: images to a multiple of {static_step.IMAGE_BUCKET} (filler images masked), Q-former "
            f"instruction to a multiple of {static_step.TEXT_BUCKET}, packed row by the plan's pack_buckets"]


def _section(title: str, fn) -> list[str]:
    try:
        return fn()
    except Exception as exc:
        return [f"{title}: unavailable ({type(exc).__name__}: {exc})"]


def report() -> str:
    """The environment report as text (what `main` prints)."""
    lines = [
        f"sam_fast: {_version('sam_fast')}",
        f"Python: {sys.version.split()[0]} ({platform.platform()})",
        f"torch: {_version('torch')}",
        f"transformers: {_version('transformers')}",
        f"triton: {_version('triton')}",
    ]
    lines += _section("devices", _devices)
    lines += _section("extension", _extension)
    lines.append("ops (backend chosen for a sample CPU input; reasons per backend):")
    lines += _section("  ops", _ops)
    lines.append("encode_images W-stream schedule (chosen once per model: SAM.w_schedule):")
    lines += _section("  schedule", _schedule)
    lines.append("LM loss:")
    lines += _section("  loss", _loss)
    lines.append("LLaMA RMSNorm/SwiGLU ops (applied in SAM's packed training step; apply_fused_llama_kernels patches for good):")
    lines += _section("  llama", _llama)
    lines.append("whole training step capture (SAM.compile_training_step(mode=...), fullgraph=True, dynamic=False):")
    lines += _section("  capture", _capture)
    lines.append('Q/W-former recomputation (recompute_qformer="auto", Vicuna-7B config, realistic batch):')
    lines += _section("  recompute", _recompute)
    lines.append("packed LLM step attention (causal within each sample; head dim 128):")
    lines += _section("  packing", _packing)
    lines.append("lavis generation (compile_decode off by default):")
    lines += _section("  generation", _generation)
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
