"""Helpers shared by the ops' launchers and backend checks (one place for each rule).

- the interpreter rule: Triton kernels run on CUDA tensors; CPU tensors take them only under
  Triton's CPU interpreter (``TRITON_INTERPRET=1``) *and* when the Triton backend is forced
  (``SAM_FAST_BACKEND=triton``): the interpreter costs milliseconds per program, so it is for tests;
- the dtype table of the kernels (fp32, fp16, bf16);
- integer helpers of the launch grids (`next_pow2`, `cdiv`);
- the "always usable" check of reference backends and the "usable / why not" table that
  ``sam-fast env`` prints.

Launchers pass ``interpret=interpreting()`` to their block-size helpers (bigger blocks under the
interpreter); the GPU compile test forces that parameter to False to capture GPU launch
configurations.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from sam_fast.ops.dispatch import ENV_VAR

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def forced_backend() -> str:
    """The backend forced through ``SAM_FAST_BACKEND`` ("" when none)."""
    return os.environ.get(ENV_VAR, "").strip()


def triton_device_reason(device: torch.device, interpreter_allowed: bool | None = None) -> str | None:
    """None when Triton kernels may run on tensors on `device`, else why not (the interpreter rule
    of the module docstring). `interpreter_allowed` replaces the "Triton backend forced" part of
    the rule (None: ask ``SAM_FAST_BACKEND``)."""
    if device.type == "cuda":
        return None
    allowed = forced_backend() == "triton" if interpreter_allowed is None else interpreter_allowed
    if device.type == "cpu" and interpreting() and allowed:
        return None
    return (f"inputs on {device}: Triton needs a CUDA device (CPU tensors only under TRITON_INTERPRET=1 "
            f"with {ENV_VAR}=triton, for tests)")


def dtype_reason(dtype: torch.dtype) -> str | None:
    """None when the kernels take `dtype` (`KERNEL_DTYPES`), else why not."""
    if dtype in KERNEL_DTYPES:
        return None
    return f"dtype {dtype} not supported (float32, float16, bfloat16)"


def next_pow2(n: int) -> int:
    """The smallest power of two >= `n` (1 for n <= 1): Triton block sizes must be powers of two."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (b > 0): the number of blocks of `b` covering `a`."""
    return -(-int(a) // int(b))


def always_usable(*args, **kwargs) -> None:
    """Backend check of the reference backends: they run any valid input."""
    return None


def usable_table(reasons: dict[str, str | None]) -> dict[str, str]:
    """`OpDispatcher.reasons` as ``{backend: "usable" or why not}`` (what ``sam-fast env`` prints)."""
    return {k: ("usable" if v is None else v) for k, v in reasons.items()}
