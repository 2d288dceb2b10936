"""Fused kernels for a frozen Hugging Face LLaMA: patch its RMSNorm and MLP modules to fused ops.

SAM's language model (``SAM.language_model``, a ``LlamaForCausalLM``) is frozen, but every
training step runs its forward and its input-gradient backward (the trainable modules sit before
it). Its element-wise layers are memory-bound chains of small PyTorch kernels; this module
replaces them, per module instance, with the fused ops of `sam_fast.ops.llama`:

- every ``LlamaRMSNorm``: ``forward`` calls `sam_fast.ops.rms_norm` (one pass forward, one
  backward, no weight-gradient reduction for a frozen weight);
- every ``LlamaMLP`` whose activation is SiLU: ``forward`` is
  ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with `sam_fast.ops.swiglu` (saves the two
  projections instead of three tensors, one kernel each way);
- rotary embeddings stay Hugging Face's ``apply_rotary_pos_emb`` (not fused: it is a module-level
  function of ``modeling_llama`` shared by every LLaMA in the process, and patching it there is
  not per-model and not cleanly reversible).

SAM's packed training step runs its LLM inside `fused_llama_kernels` (patched for the call, on
every device: Triton where it runs, else the lean ``torch`` autograd backend that keeps half the
activations of these layers). For other uses (generation, your own loop), patch a model for good::

    from sam_fast.models.llama_kernels import apply_fused_llama_kernels, remove_fused_llama_kernels

    report = apply_fused_llama_kernels(sam.language_model)   # after moving the model to CUDA
    print(report["summary"])
    ...
    remove_fused_llama_kernels(sam.language_model)            # back to Hugging Face's forwards

The patch is applied only where the ops run fused (Triton on CUDA); elsewhere the report says
why and nothing changes, unless ``force=True`` (then the ops run whatever backend the dispatcher
picks per call: the plain-PyTorch reference on CPU, the Triton kernel under
``TRITON_INTERPRET=1`` with ``SAM_FAST_BACKEND=triton``). The patched forwards dispatch per call,
so a patched model moved between devices stays correct. Outputs and input gradients equal Hugging
Face's within the flash-attention error budget (the fused error at most twice PyTorch's own
error in the same dtype, both against float64): the kernels round once where PyTorch rounds
after each step.

liger-kernel is not used even where installed: its LLaMA patch replaces classes and functions of
``modeling_llama`` for the whole process (not reversible per model) and its RMSNorm backward always
reduces the weight gradient; the report says whether it is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Iterator

import torch

_MARK = "_sam_fast_fused"  # instance attribute: which fused forward the module got
_SILU = ("silu", "swish")


def _llama_classes():
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    return LlamaRMSNorm, LlamaMLP


def _rms_norm_forward(self, hidden_states):
    from sam_fast.ops.llama import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from sam_fast.ops.llama import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _targets(language_model):
    """(RMSNorm modules, SiLU MLP modules, modules skipped with the reason) of a LLaMA. Only
    modules running Hugging Face's own forward are patched (a subclass that overrides it is
    skipped)."""
    LlamaRMSNorm, LlamaMLP = _llama_classes()
    norms, mlps, skipped = [], [], []
    for name, mod in language_model.named_modules():
        for cls in (LlamaRMSNorm, LlamaMLP):
            if isinstance(mod, cls) and type(mod).forward is not cls.forward:
                skipped.append(f"{name}: {type(mod).__name__}.forward is not Hugging Face's {cls.__name__}.forward")
        if isinstance(mod, LlamaRMSNorm):
            if type(mod).forward is LlamaRMSNorm.forward:
                norms.append((name, mod))
        elif isinstance(mod, LlamaMLP) and type(mod).forward is LlamaMLP.forward:
            act = getattr(getattr(mod, "config", None), "hidden_act", None)
            if act in _SILU:
                mlps.append((name, mod))
            else:
                skipped.append(f"{name}: activation {act!r} is not SiLU")
    return norms, mlps, skipped


def _where(language_model):
    """(device, dtype) of the model's first RMSNorm weight (else its first parameter)."""
    norms, _, _ = _targets(language_model)
    for _, mod in norms:
        return mod.weight.device, mod.weight.dtype
    for p in language_model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _liger_status() -> str:
    try:
        mod = importlib.import_module("liger_kernel")
    except ImportError:
        return "not installed"
    except Exception as exc:  # installed but broken
        return f"installed but broken ({type(exc).__name__}: {exc})"
    version = getattr(mod, "__version__", "version unknown")
    return (f"installed ({version}), not used: its LLaMA patch replaces modeling_llama's classes for the "
            f"whole process and its RMSNorm backward always reduces the weight gradient")


def fused_llama_kernels_plan(device="cpu", dtype=torch.float32, hidden_size: int = 4096) -> dict:
    """What `apply_fused_llama_kernels` would do for a LLaMA on `device` in `dtype`, without a model:
    {"fused": bool, "rms_norm": backend, "swiglu": backend, "reasons": {op: {backend: why}},
    "rope": str, "liger_kernel": str, "summary": one line}. What ``sam-fast env`` prints."""
    from sam_fast.ops.llama import rms_norm_backend, swiglu_backend

    rms, rms_reasons = rms_norm_backend(device, dtype, hidden_size)
    act, act_reasons = swiglu_backend(device, dtype)
    fused = rms == "triton" and act == "triton"
    rope = "Hugging Face's apply_rotary_pos_emb (not fused)"
    if fused:
        summary = f"RMSNorm and SwiGLU fused (Triton); RoPE: {rope}"
    else:
        why = rms_reasons.get("triton") if rms != "triton" else act_reasons.get("triton")
        summary = f"RMSNorm {rms}, SwiGLU {act} backend (Triton unusable: {why})"
        if rms == act == "torch":
            summary = f"RMSNorm and SwiGLU on the lean autograd backend 'torch' (Triton unusable: {why})"
    return {"fused": fused, "device": str(torch.device(device)), "dtype": str(dtype), "rms_norm": rms,
            "swiglu": act, "reasons": {"rms_norm": rms_reasons, "swiglu": act_reasons}, "rope": rope,
            "liger_kernel": _liger_status(), "summary": summary}


def _patch(mod, fn, kind: str) -> bool:
    """Give `mod` the fused forward; False if it already has one."""
    if getattr(mod, _MARK, None) is not None:
        return False
    mod.forward = types.MethodType(fn, mod)
    setattr(mod, _MARK, kind)
    return True


def apply_fused_llama_kernels(language_model: torch.nn.Module, force: bool = False) -> dict:
    """Patch the RMSNorm and SiLU-MLP modules of a Hugging Face LLaMA to the fused ops (module
    docstring), per instance, where the ops run fused.

    Args:
        language_model: a ``LlamaForCausalLM`` / ``LlamaModel`` (e.g. ``SAM.language_model``),
            already on its device and in its dtype.
        force: patch even where the Triton backend cannot run (the ops then pick their backend
            per call; for tests and for models moved to CUDA later).

    Returns:
        The plan of `fused_llama_kernels_plan` for the model's device and dtype plus "applied"
        (bool), "patched" ({"rms_norm": n, "swiglu": n} modules newly patched), "already"
        (modules that were patched before), "skipped" (modules left alone, with the reason: a
        non-SiLU MLP, a subclass with its own forward, a module whose forward is already wrapped
        per instance, e.g. by an accelerate offload hook) and a one-line "summary". Calling it
        twice patches nothing more.

    Raises:
        TypeError: if `language_model` is not an ``nn.Module``.
        ValueError: if it holds no LlamaRMSNorm and no LlamaMLP (not a LLaMA).
    """
    if not isinstance(language_model, torch.nn.Module):
        raise TypeError(f"apply_fused_llama_kernels: expected an nn.Module, got {type(language_model).__name__}")
    norms, mlps, skipped = _targets(language_model)
    if not norms and not mlps:
        raise ValueError(f"apply_fused_llama_kernels: {type(language_model).__name__} has no LlamaRMSNorm or "
                         f"LlamaMLP module running Hugging Face's forward (not a Hugging Face LLaMA)"
                         + (f": {'; '.join(skipped[:3])}" if skipped else ""))
    device, dtype = _where(language_model)
    report = fused_llama_kernels_plan(device, dtype, hidden_size=norms[0][1].weight.shape[0] if norms else 4096)
    report.update(applied=False, forced=force, patched={"rms_norm": 0, "swiglu": 0}, already=0, skipped=skipped)
    if not report["fused"] and not force:
        report["summary"] = f"not applied (force=True patches anyway): {report['summary']}"
        return report
    for kind, mods, fn in (("rms_norm", norms, _rms_norm_forward), ("swiglu", mlps, _mlp_forward)):
        for name, mod in mods:
            if "forward" in mod.__dict__ and getattr(mod, _MARK, None) is None:
                # an instance-level wrapper (an accelerate offload hook, another patch): replacing
                # it would bypass what it does
                report["skipped"].append(f"{name}: already has an instance-level forward, left alone")
            elif _patch(mod, fn, kind):
                report["patched"][kind] += 1
            else:
                report["already"] += 1
    report["applied"] = True
    p = report["patched"]
    how = "fused (Triton)" if report["fused"] else "forced (backend chosen per call)"
    report["summary"] = (f"patched {p['rms_norm']} RMSNorm and {p['swiglu']} MLP modules, {how}; "
                         f"{report['already']} already patched; RoPE: {report['rope']}")
    return report


def remove_fused_llama_kernels(language_model: torch.nn.Module) -> int:
    """Undo `apply_fused_llama_kernels`: every patched module gets back its class's forward.
    Returns the number of modules restored (0 if none was patched)."""
    restored = 0
    for mod in language_model.modules():
        if getattr(mod, _MARK, None) is None:
            continue
        mod.__dict__.pop("forward", None)
        delattr(mod, _MARK)
        restored += 1
    return restored


def fused_llama_kernels_applied(language_model: torch.nn.Module) -> dict[str, int]:
    """{"rms_norm": n, "swiglu": n}: how many modules of the model run a fused forward now."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for mod in language_model.modules():
        kind = getattr(mod, _MARK, None)
        if kind in counts:
            counts[kind] += 1
    return counts


@contextlib.contextmanager
def fused_llama_kernels(language_model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Run `language_model` with the fused ops inside the block, whatever the device: the patch of
    `apply_fused_llama_kernels` (forced, so each call takes the dispatcher's backend: Triton on
    CUDA, the lean ``torch`` autograd backend elsewhere), undone on exit for the modules this block
    patched (modules patched before stay patched). A backward run after the block still uses the
    fused ops' saved tensors and backwards. Yields `fused_llama_kernels_applied` inside the block.
    SAM's packed training step runs its LLM this way; generation and the padded path keep Hugging
    Face's forwards. A float64 model is left alone (Hugging Face's RMSNorm computes its
    statistics in float32 even there; the fused ops keep float64), so float64 checks compare like
    with like."""
    norms, mlps, _ = _targets(language_model)
    if any(mod.weight.dtype == torch.float64 for _, mod in norms):
        norms, mlps = [], []  # Hugging Face's RMSNorm computes a float64 model's norms in float32
    mine = []
    for kind, mods, fn in (("rms_norm", norms, _rms_norm_forward), ("swiglu", mlps, _mlp_forward)):
        for _, mod in mods:
            if "forward" not in mod.__dict__ and _patch(mod, fn, kind):
                mine.append(mod)
    try:
        yield fused_llama_kernels_applied(language_model)
    finally:
        for mod in mine:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop(_MARK, None)
