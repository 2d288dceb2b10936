"""Triton kernels of sam_fast: bare ``@triton.jit`` functions, no launchers.

A plain subpackage, ``sam_fast._kernels`` (``sam_fast/_kernels/llama.py`` is imported as
``sam_fast._kernels.llama``), not a top-level ``kernels`` folder: with a checkout's root on
``sys.path`` (``python -m pytest``, ``python -m sam_fast.cli``) that folder would shadow the
``kernels`` package transformers >= 5.25 imports. Only `sam_fast.ops` imports it, inside the
Triton launchers, so a machine without Triton never touches these modules. Grids, block sizes, autograd, the
torch.library registration and the backend choice live in the op modules:

    _common.py           -> device helpers of the other files (the block prologue
                            `_span`, `_row_block`), no kernel
    context_reweight.py  -> sam_fast.ops.context_reweight (its "triton" backend)
        context_reweight_coef_kernel, context_reweight_fwd_kernel, context_reweight_bwd_kernel,
        context_reweight_dscore_kernel
        (the op's "cpu" and "cuda" backends are C++/CUDA in csrc/, built into sam_fast._C)
    cross_attention.py   -> sam_fast.ops.cross_attention (cross_attention and
                            cross_attention_streams, "triton" backend)
        attn_fwd_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, mix_weight_grad_kernel
    llama.py             -> sam_fast.ops.llama (rms_norm and swiglu, "triton" backend;
                            patched into the LLaMA by sam_fast.models.llama_kernels)
        rms_norm_fwd_kernel, rms_norm_bwd_kernel, swiglu_fwd_kernel, swiglu_bwd_kernel

``sam_fast.ops._common`` imports every file once (`triton_import_error`, the one probe of whether
Triton and these kernels load here) and launches none.

The op modules' PyTorch ``*_ref`` functions are the specification each kernel is tested against.
"""
