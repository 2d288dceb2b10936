"""Helpers shared by the ops' launchers and backend checks (one place for each rule).

- the interpreter rule: Triton kernels run on CUDA tensors; CPU tensors take them only under
  Triton's CPU interpreter (``TRITON_INTERPRET=1``) *and* when the Triton backend is forced
  (``SAM_FAST_BACKEND=triton``): the interpreter costs milliseconds per program, so it is for tests;
- the dtype table of the kernels (fp32, fp16, bf16);
- integer helpers of the launch grids (`next_pow2`, `cdiv`);
- whether the Triton kernels can be imported here (`triton_import_error`, probed once);
- the "always usable" check of reference backends. (The forced backend and the "usable / why
  not" table that ``sam-fast env`` prints belong to the dispatcher: `sam_fast.ops.dispatch`.)

Launchers pass ``interpret=interpreting()`` to their block-size helpers (bigger blocks under the
interpreter); the GPU compile test forces that parameter to False to capture GPU launch
configurations.
"""

from __future__ import annotations

import os

import torch

from sam_fast.ops.dispatch import ENV_VAR, forced_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_UNPROBED = "unprobed"
# Result of the one import attempt (None: importable), `_UNPROBED` until the first check. Cached:
# an import attempted on every call costs a failed module search each time and, under
# torch.compile, a graph break per op call when Triton is not installed.
_triton_probe: str | None = _UNPROBED


def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401

        import sam_fast._kernels.context_reweight  # noqa: F401
        import sam_fast._kernels.cross_attention  # noqa: F401
        import sam_fast._kernels.llama  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that cannot initialise here
        return f"triton kernels not importable ({type(exc).__name__}: {exc})"
    return None


@torch.compiler.assume_constant_result
def triton_import_error() -> str | None:
    """Why the Triton kernels cannot be imported (None: they can), the one test of Triton's
    presence. Probed once per process and cached; torch.compile takes the answer as a constant
    (the probe runs eagerly, never traced)."""
    global _triton_probe
    if _triton_probe == _UNPROBED:
        _triton_probe = _probe_triton()
    return _triton_probe


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_forced() -> bool:
    """Whether ``SAM_FAST_BACKEND=triton``: the second half of the interpreter rule."""
    return forced_backend() == "triton"


def triton_device_reason(device: torch.device | str, interpreter_allowed: bool | None = None) -> str | None:
    """None when Triton kernels may run on tensors on `device` (a device or its type), else why
    not (the interpreter rule of the module docstring). `interpreter_allowed` replaces the "Triton
    backend forced" part of the rule (None: ask ``SAM_FAST_BACKEND``)."""
    device_type = device if isinstance(device, str) else device.type
    if device_type == "cuda":
        return None
    allowed = triton_forced() if interpreter_allowed is None else interpreter_allowed
    if device_type == "cpu" and interpreting() and allowed:
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
