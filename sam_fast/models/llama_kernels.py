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
- every ``LlamaAttention`` (with `apply_fused_llama_kernels`): ``q_proj``, ``k_proj`` and
  ``v_proj`` become one ``qkv_proj`` Linear and the MLP's ``gate_proj`` / ``up_proj`` one
  ``gate_up_proj`` (one GEMM each, as gpt-fast fuses them; the weights are concatenated once and
  no second copy is kept). The attention forward applies RoPE itself, to the query and key
  heads in one call (`sam_fast.ops.llama.rope`; Hugging Face's module-level
  ``apply_rotary_pos_emb`` is shared by every LLaMA in the process and is not patched), then
  calls the config's attention function as Hugging Face's forward does: the packed step's
  varlen attention, SDPA or eager, with a KV cache during generation. State-dict hooks keep
  Hugging Face's keys: ``state_dict()`` and saved files hold ``q_proj.weight`` ... (views of the
  fused weight), and a state dict with those keys loads into the fused model.

SAM's packed training step runs its LLM inside `fused_llama_kernels` (patched for the call, on
every device: Triton where it runs, else the lean ``torch`` autograd backend that keeps half the
activations of these layers). For other uses (generation, your own loop), patch a model for good::

    from sam_fast.models.llama_kernels import apply_fused_llama_kernels, remove_fused_llama_kernels

    report = apply_fused_llama_kernels(sam.language_model)   # after moving the model to CUDA
    print(report["summary"])
    ...
    remove_fused_llama_kernels(sam.language_model)            # back to Hugging Face's modules

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
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

    return LlamaRMSNorm, LlamaMLP, LlamaAttention


def _rms_norm_forward(self, hidden_states):
    from sam_fast.ops.llama import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from sam_fast.ops.llama import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _targets(language_model):
    """(RMSNorm modules, SiLU MLP modules, attention modules, modules skipped with the reason) of a
    LLaMA, each a list of (name, module). Only modules running Hugging Face's own forward are
    patched (a subclass that overrides it is skipped)."""
    LlamaRMSNorm, LlamaMLP, LlamaAttention = _llama_classes()
    norms, mlps, attns, skipped = [], [], [], []
    for name, mod in language_model.named_modules():
        for cls in (LlamaRMSNorm, LlamaMLP, LlamaAttention):
            if isinstance(mod, cls) and type(mod).forward is not cls.forward:
                skipped.append(f"{name}: {type(mod).__name__}.forward is not Hugging Face's {cls.__name__}.forward")
        if isinstance(mod, LlamaRMSNorm):
            if type(mod).forward is LlamaRMSNorm.forward:
                norms.append((name, mod))
        elif isinstance(mod, LlamaAttention):
            if type(mod).forward is LlamaAttention.forward:
                attns.append((name, mod))
        elif isinstance(mod, LlamaMLP) and type(mod).forward is LlamaMLP.forward:
            act = getattr(getattr(mod, "config", None), "hidden_act", None)
            if act in _SILU:
                mlps.append((name, mod))
            else:
                skipped.append(f"{name}: activation {act!r} is not SiLU")
    return norms, mlps, attns, skipped


# -- fused projections: Q/K/V and gate|up as one GEMM each ----------------------------------------
_UNFUSED = "_sam_fast_unfused"  # instance attribute: {"parts": {fused: (names, modules, sizes)}, "hooks": [...]}
_FUSIONS = {"attention": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
            "swiglu": ("gate_up_proj", ("gate_proj", "up_proj"))}


def _fusion_reason(mod, parts) -> str | None:
    """Why the Linear children `parts` of `mod` cannot become one Linear, or None: each must be a
    plain ``nn.Linear`` without hooks (a quantised or LoRA-wrapped layer is left alone), all alike
    in input size, dtype, device, requires_grad and bias."""
    lins = [mod._modules.get(p) for p in parts]
    for name, lin in zip(parts, lins):
        if type(lin) is not torch.nn.Linear:
            return f"{name} is {type(lin).__name__}, not a plain nn.Linear"
        if lin._forward_hooks or lin._forward_pre_hooks or "forward" in lin.__dict__:
            return f"{name} has forward hooks or an instance-level forward"
        if lin.weight.is_meta:
            return f"{name}'s weight is on the meta device"
    alike = {(lin.in_features, lin.weight.dtype, lin.weight.device, lin.weight.requires_grad, lin.bias is None)
             for lin in lins}
    if len(alike) != 1:
        return f"{'/'.join(parts)} differ in input size, dtype, device, requires_grad or bias"
    return None


def _replace_children(mod, old: list[str], new: dict) -> None:
    """Put the children `new` ({name: module}) where `old[0]` was and drop the `old` ones, so the
    module order (and with it the order of state_dict keys) stays Hugging Face's."""
    items = list(mod._modules.items())
    mod._modules.clear()
    for name, child in items:
        if name == old[0]:
            mod._modules.update(new)
        if name not in old:
            mod._modules[name] = child


def _fuse(mod, fused_name: str, parts) -> None:
    """Replace the Linear children `parts` of `mod` ([out_i, in] weights) by one Linear `fused_name`
    with weight ``[sum(out_i), in]`` (and bias) their concatenation. The original modules are kept
    unregistered with their parameters emptied (no second copy of the weights) for `_unfuse`."""
    lins = [mod._modules[p] for p in parts]
    sizes = [lin.out_features for lin in lins]
    fused = torch.nn.Linear(lins[0].in_features, sum(sizes), bias=lins[0].bias is not None, device="meta")
    for leaf in ("weight", "bias"):
        params = [getattr(lin, leaf) for lin in lins]
        if params[0] is None:
            continue
        data = torch.cat([p.detach() for p in params])
        setattr(fused, leaf, torch.nn.Parameter(data, requires_grad=params[0].requires_grad))
        for p in params:
            p.data = p.data.new_empty(0)
    _replace_children(mod, list(parts), {fused_name: fused})
    info = mod.__dict__.get(_UNFUSED)
    if info is None:
        hooks = [mod.register_state_dict_post_hook(_split_fused_state),
                 mod.register_load_state_dict_pre_hook(_fuse_loaded_state)]
        info = mod.__dict__[_UNFUSED] = {"parts": {}, "hooks": hooks}
    info["parts"][fused_name] = (tuple(parts), lins, sizes)


def _unfuse(mod) -> None:
    """Undo `_fuse`: the original modules and Parameter objects come back, holding the fused
    Linear's current values (row slices of its weight: still no copy), the hooks go."""
    info = mod.__dict__.pop(_UNFUSED, None)
    if info is None:
        return
    for hook in info["hooks"]:
        hook.remove()
    for fused_name, (parts, lins, sizes) in info["parts"].items():
        fused = mod._modules[fused_name]
        for leaf in ("weight", "bias"):
            value = getattr(fused, leaf)
            if value is None:
                continue
            for lin, piece in zip(lins, value.detach().split(sizes)):
                param = getattr(lin, leaf)
                param.data = piece
                param.requires_grad_(value.requires_grad)
        _replace_children(mod, [fused_name], dict(zip(parts, lins)))


def _split_fused_state(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: each fused entry ``{prefix}{fused}.weight`` ``[sum(out_i), in]`` (and
    bias) becomes its parts' entries (views), in Hugging Face's key order, so state dicts and saved
    files keep the unfused model's keys and values."""
    info = module.__dict__.get(_UNFUSED)
    if not info:
        return
    tail = []  # this module's entries: the last ones written
    for key in reversed(state_dict):
        if not key.startswith(prefix):
            break
        tail.append(key)
    for key, value in [(k, state_dict.pop(k)) for k in reversed(tail)]:
        name, _, leaf = key[len(prefix):].partition(".")
        if name in info["parts"] and leaf in ("weight", "bias"):
            parts, _, sizes = info["parts"][name]
            for part, piece in zip(parts, value.split(sizes)):
                state_dict[f"{prefix}{part}.{leaf}"] = piece
        else:
            state_dict[key] = value


def _fuse_loaded_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """load_state_dict pre-hook: a state dict with Hugging Face's keys (``q_proj.weight``, ...)
    loads into the fused module, its parts concatenated into the fused entry; parts of the wrong
    size are named in one error and left for load_state_dict to report."""
    for name, (parts, _, sizes) in module.__dict__[_UNFUSED]["parts"].items():
        for leaf in ("weight", "bias"):
            keys = [f"{prefix}{p}.{leaf}" for p in parts]
            if not all(k in state_dict for k in keys) or f"{prefix}{name}.{leaf}" in state_dict:
                continue
            pieces = [state_dict[k] for k in keys]
            if [t.shape[0] for t in pieces] != sizes or len({tuple(t.shape[1:]) for t in pieces}) != 1:
                error_msgs.append(f"{prefix}{name}.{leaf}: cannot fuse {'/'.join(parts)} of shapes "
                                  f"{[tuple(t.shape) for t in pieces]} (the model's are {sizes} rows)")
                continue
            state_dict[f"{prefix}{name}.{leaf}"] = torch.cat(pieces)
            for k in keys:
                del state_dict[k]


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       cache=None, **kwargs):
    """``LlamaAttention.forward`` with Q/K/V from one GEMM (``qkv_proj``) and RoPE applied once to
    the query and key heads together (`sam_fast.ops.llama.rope`); the attention function is the
    config's, as in Hugging Face's forward (the packed step's varlen attention, SDPA, eager; a KV
    cache is updated the same way; it arrives as ``cache`` from transformers 5.25 on, as
    ``past_key_values`` before). hidden ``[B, S, H]`` -> (``[B, S, H]``, weights or None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from sam_fast.ops.llama import rope

    shape = hidden_states.shape[:-1]
    q_size, kv_size, _ = self.__dict__[_UNFUSED]["parts"]["qkv_proj"][2]
    hq, hkv = q_size // self.head_dim, kv_size // self.head_dim
    qkv = self.qkv_proj(hidden_states).view(*shape, hq + 2 * hkv, self.head_dim)
    qk, value = qkv.split([hq + hkv, hkv], dim=-2)
    cos, sin = position_embeddings
    query, key = rope(qk, cos, sin).split([hq, hkv], dim=-2)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, S, d]
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attend(self, query, key, value, attention_mask, scaling=self.scaling,
                          dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
    return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _mlp_fused_forward(self, x):
    """``LlamaMLP.forward`` with gate and up from one GEMM (``gate_up_proj``, ``[B, S, 2I]``)."""
    from sam_fast.ops.llama import swiglu

    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(swiglu(gate, up))


def _where(language_model):
    """(device, dtype) of the model's first RMSNorm weight (else its first parameter)."""
    norms = _targets(language_model)[0]
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
    "rope": str, "projections": str, "liger_kernel": str, "summary": one line}. What ``sam-fast env`` prints."""
    from sam_fast.ops.llama import rms_norm_backend, swiglu_backend

    rms, rms_reasons = rms_norm_backend(device, dtype, hidden_size)
    act, act_reasons = swiglu_backend(device, dtype)
    fused = rms == "triton" and act == "triton"
    rope = ("sam_fast.ops.llama.rope on the query and key heads at once in the fused-QKV attention (plain "
            "PyTorch, not fused into a kernel: kernels/llama.py has none; Hugging Face's apply_rotary_pos_emb "
            "stays as it is)")
    projections = "Q/K/V and gate|up as one GEMM each (state dicts keep Hugging Face's keys)"
    if fused:
        summary = f"RMSNorm and SwiGLU fused (Triton); {projections}; RoPE: {rope}"
    else:
        why = rms_reasons.get("triton") if rms != "triton" else act_reasons.get("triton")
        summary = f"RMSNorm {rms}, SwiGLU {act} backend (Triton unusable: {why})"
        if rms == act == "torch":
            summary = f"RMSNorm and SwiGLU on the lean autograd backend 'torch' (Triton unusable: {why})"
    return {"fused": fused, "device": str(torch.device(device)), "dtype": str(dtype), "rms_norm": rms,
            "swiglu": act, "reasons": {"rms_norm": rms_reasons, "swiglu": act_reasons}, "rope": rope,
            "projections": projections, "liger_kernel": _liger_status(), "summary": summary}


def _patch(mod, fn, kind: str) -> bool:
    """Give `mod` the fused forward; False if it already has one."""
    if getattr(mod, _MARK, None) is not None:
        return False
    mod.forward = types.MethodType(fn, mod)
    setattr(mod, _MARK, kind)
    return True


_FORWARDS = {"rms_norm": _rms_norm_forward, "swiglu": _mlp_forward}
_FUSED_FORWARDS = {"attention": _attention_forward, "swiglu": _mlp_fused_forward}


def _patch_module(report: dict, kind: str, name: str, mod, fuse_projections: bool) -> None:
    """Patch one module of kind "rms_norm", "swiglu" or "attention" (projections fused where
    `fuse_projections` and they can be; an attention whose can't keeps Hugging Face's forward),
    counting what happened in `report`."""
    if "forward" in mod.__dict__ and getattr(mod, _MARK, None) is None:
        # an instance-level wrapper (an accelerate offload hook, another patch): replacing it
        # would bypass what it does
        report["skipped"].append(f"{name}: already has an instance-level forward, left alone")
        return
    if getattr(mod, _MARK, None) is not None:
        report["already"] += 1
        return
    fn = _FORWARDS.get(kind)
    if kind in _FUSIONS and fuse_projections:
        fused_name, parts = _FUSIONS[kind]
        why = _fusion_reason(mod, parts)
        if why is None:
            _fuse(mod, fused_name, parts)
            fn = _FUSED_FORWARDS[kind]
            report["fused_projections"][fused_name] += 1
        else:
            report["skipped"].append(f"{name}: projections not fused: {why}")
    if fn is not None:
        _patch(mod, fn, kind)
        report["patched"][kind] += 1


def apply_fused_llama_kernels(language_model: torch.nn.Module, force: bool = False,
                              fuse_projections: bool = True) -> dict:
    """Patch the RMSNorm, SiLU-MLP and attention modules of a Hugging Face LLaMA to the fused ops
    and fused projections (module docstring), per instance, where the ops run fused.

    Args:
        language_model: a ``LlamaForCausalLM`` / ``LlamaModel`` (e.g. ``SAM.language_model``),
            already on its device and in its dtype.
        force: patch even where the Triton backend cannot run (the ops then pick their backend
            per call; for tests and for models moved to CUDA later).
        fuse_projections: replace q/k/v_proj by one ``qkv_proj`` ``[(Hq + 2 Hkv) d, H]`` and
            gate/up_proj by one ``gate_up_proj`` ``[2 I, H]`` (weights concatenated, not copied
            twice); ``state_dict`` and ``load_state_dict`` keep Hugging Face's keys.

    Returns:
        The plan of `fused_llama_kernels_plan` for the model's device and dtype plus "applied"
        (bool), "patched" ({"rms_norm": n, "swiglu": n, "attention": n} modules newly patched),
        "fused_projections" ({"qkv_proj": n, "gate_up_proj": n}), "already" (modules patched
        before), "skipped" (what was left alone, with the reason: a non-SiLU MLP, a subclass with
        its own forward, a module whose forward is already wrapped per instance, e.g. by an
        accelerate offload hook, projections that are not plain alike Linears) and a one-line
        "summary". Calling it twice patches nothing more.

    Raises:
        TypeError: if `language_model` is not an ``nn.Module``.
        ValueError: if it holds no LlamaRMSNorm and no LlamaMLP (not a LLaMA).
    """
    if not isinstance(language_model, torch.nn.Module):
        raise TypeError(f"apply_fused_llama_kernels: expected an nn.Module, got {type(language_model).__name__}")
    norms, mlps, attns, skipped = _targets(language_model)
    if not norms and not mlps:
        raise ValueError(f"apply_fused_llama_kernels: {type(language_model).__name__} has no LlamaRMSNorm or "
                         f"LlamaMLP module running Hugging Face's forward (not a Hugging Face LLaMA)"
                         + (f": {'; '.join(skipped[:3])}" if skipped else ""))
    device, dtype = _where(language_model)
    report = fused_llama_kernels_plan(device, dtype, hidden_size=norms[0][1].weight.shape[0] if norms else 4096)
    report.update(applied=False, forced=force, patched={"rms_norm": 0, "swiglu": 0, "attention": 0},
                  fused_projections={"qkv_proj": 0, "gate_up_proj": 0}, already=0, skipped=skipped)
    if not report["fused"] and not force:
        report["summary"] = f"not applied (force=True patches anyway): {report['summary']}"
        return report
    for kind, mods in (("rms_norm", norms), ("swiglu", mlps), ("attention", attns)):
        for name, mod in mods:
            _patch_module(report, kind, name, mod, fuse_projections)
    report["applied"] = True
    p, f = report["patched"], report["fused_projections"]
    how = "fused (Triton)" if report["fused"] else "forced (backend chosen per call)"
    report["summary"] = (f"patched {p['rms_norm']} RMSNorm, {p['swiglu']} MLP and {p['attention']} attention "
                         f"modules, {how}; {f['qkv_proj']} QKV and {f['gate_up_proj']} gate|up projections fused; "
                         f"{report['already']} already patched; RoPE: {report['rope']}")
    return report


def remove_fused_llama_kernels(language_model: torch.nn.Module) -> int:
    """Undo `apply_fused_llama_kernels`: every patched module gets back its class's forward, and
    fused projections their original modules and Parameter objects (with the current values).
    Returns the number of modules restored (0 if none was patched)."""
    restored = 0
    for mod in list(language_model.modules()):
        if getattr(mod, _MARK, None) is None:
            continue
        mod.__dict__.pop("forward", None)
        delattr(mod, _MARK)
        _unfuse(mod)
        restored += 1
    return restored


def fused_llama_kernels_applied(language_model: torch.nn.Module) -> dict[str, int]:
    """{"rms_norm": n, "swiglu": n, "attention": n}: how many modules of the model run a fused
    forward now."""
    counts = {"rms_norm": 0, "swiglu": 0, "attention": 0}
    for mod in language_model.modules():
        kind = getattr(mod, _MARK, None)
        if kind in counts:
            counts[kind] += 1
    return counts


@contextlib.contextmanager
def fused_llama_kernels(language_model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Run `language_model` with the fused ops inside the block, whatever the device: the RMSNorm
    and SwiGLU patch of `apply_fused_llama_kernels` (forced, so each call takes the dispatcher's
    backend: Triton on CUDA, the lean ``torch`` autograd backend elsewhere; projections are not
    fused here, as that would copy the weights on every call), undone on exit for the modules this
    block patched (modules patched before, fused projections included, stay as they are). A
    backward run after the block still uses the fused ops' saved tensors and backwards. Yields
    `fused_llama_kernels_applied` inside the block. SAM's packed training step runs its LLM this
    way; generation and the padded path keep Hugging Face's forwards. A float64 model is left
    alone (Hugging Face's RMSNorm computes its statistics in float32 even there; the fused ops
    keep float64), so float64 checks compare like with like."""
    norms, mlps, _, _ = _targets(language_model)
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
