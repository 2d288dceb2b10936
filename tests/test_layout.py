"""The package layout: shared op helpers defined once, no import circles, the trainer kept out of
inference imports, `TRAINABLE_MODULES` defined once, the kernels' mapping documented."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sam_fast"
OPS = PKG / "ops"

# helpers whose definition lives in sam_fast/ops/_common.py only
SHARED_HELPERS = {"next_pow2", "triton_next_pow2", "cdiv", "triton_cdiv", "_interpreting", "interpreting",
                  "_check_reference", "_check_chunked", "_reasons", "_triton_device_reason"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("path", sorted(p.name for p in OPS.glob("*.py") if p.name != "_common.py"))
def test_op_modules_define_no_shared_helper(path):
    """Helpers of the launchers and checks (interpreter rule, dtype table, next_pow2/cdiv) are
    imported from sam_fast.ops._common, not defined again per op."""
    tree = _tree(OPS / path)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not defined & SHARED_HELPERS, f"{path} defines {sorted(defined & SHARED_HELPERS)} again"
    tables = [t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple)
              for t in n.targets if isinstance(t, ast.Name)
              if {ast.unparse(e) for e in n.value.elts} == {"torch.float32", "torch.float16", "torch.bfloat16"}]
    assert not tables, f"{path} defines its own dtype table {tables}"
    text = (OPS / path).read_text()
    assert 'environ.get("TRITON_INTERPRET"' not in text, f"{path} reads TRITON_INTERPRET itself"
    if path != "dispatch.py":  # the dispatcher owns SAM_FAST_BACKEND
        assert "os.environ.get(ENV_VAR" not in text, f"{path} reads the forced backend itself"


def test_common_helpers():
    from sam_fast.ops import _common

    assert [_common.next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 257)] == [1, 1, 2, 4, 4, 8, 16, 32, 512]
    assert [_common.cdiv(a, 4) for a in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert _common.dtype_reason(__import__("torch").bfloat16) is None
    assert "float64" in _common.dtype_reason(__import__("torch").float64)
    assert _common.usable_table({"a": None, "b": "no"}) == {"a": "usable", "b": "no"}


def test_interpreter_rule(monkeypatch):
    import torch

    from sam_fast.ops import _common

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _common.triton_device_reason(cuda) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SAM_FAST_BACKEND", "triton")
    assert "Triton needs a CUDA device" in _common.triton_device_reason(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.triton_device_reason(cpu) is None
    monkeypatch.setenv("SAM_FAST_BACKEND", "reference")
    assert "TRITON_INTERPRET=1" in _common.triton_device_reason(cpu)
    assert _common.triton_device_reason(cpu, interpreter_allowed=True) is None
