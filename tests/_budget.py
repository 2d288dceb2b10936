"""The error-budget rule of the op tests (tests/ops/test_<op>.py) and of the model-level checks that
compare a fused path with PyTorch's (flash-attention's rule): against the float64 oracle, the
fast result's error is at most ``factor`` times the error of the plain PyTorch formula in the same
dtype, plus ``floor`` times the oracle's largest magnitude plus ``atol`` (small allowances for
quantities PyTorch happens to compute exactly). Each op test file holds its own table
``dtype -> Budget``."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Budget(NamedTuple):
    """How much error one dtype may have: ``factor`` x PyTorch's own error + ``floor`` x the
    oracle's largest magnitude + ``atol``."""

    factor: float
    floor: float
    atol: float = 0.0

    def allowed(self, torch_error: float, scale: float) -> float:
        """The largest error allowed where PyTorch's own error is `torch_error` and the oracle's
        largest magnitude is `scale`."""
        return self.factor * torch_error + self.floor * scale + self.atol


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference of `got` (any dtype) from the float64 `exact`."""
    return (got.double() - exact).abs().max().item() if exact.numel() else 0.0


def assert_within_budget(fast, plain, exact, names, budget: Budget) -> None:
    """For every quantity (forward output, then each gradient) of the three sequences, named by
    `names`: `fast` has the oracle's shape, is finite, and its error against the float64 `exact`
    is within `budget` of the error of `plain` (PyTorch's formula in the same dtype)."""
    fast, plain, exact, names = list(fast), list(plain), list(exact), list(names)
    assert len(fast) == len(plain) == len(exact) == len(names), (len(fast), len(plain), len(exact), names)
    for f, p, r, name in zip(fast, plain, exact, names):
        assert f.shape == r.shape, f"{name}: shape {tuple(f.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(f).all(), f"{name}: non-finite values"
        err = max_error(f, r)
        scale = r.abs().max().item() if r.numel() else 0.0
        allowed = budget.allowed(max_error(p, r), scale)
        assert err <= allowed, f"{name}: error {err:.3g} > budget {allowed:.3g} (scale {scale:.3g})"


def spy_calls(monkeypatch, module, names: dict[str, str]) -> dict[str, int]:
    """Count the calls of `module`'s functions: ``names`` maps a key to a function name; returns
    ``{key: count}``, updated as the (monkeypatched) functions are called."""
    calls = dict.fromkeys(names, 0)
    for key, name in names.items():
        orig = getattr(module, name)

        def spy(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(module, name, spy)
    return calls
