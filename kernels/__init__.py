"""Triton kernels of sam_fast (bare ``@triton.jit`` functions), installed as ``sam_fast._kernels``.

Only `sam_fast.ops` imports this package: the launchers, autograd and dispatch live there, so a
machine without Triton never touches these modules.
"""
