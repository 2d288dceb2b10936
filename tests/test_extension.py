"""The compiled extension sam_fast._C: build info, the CPU op against a float64 oracle, input
checks, the loader's refusals, and compile checks of the CUDA sources (no GPU needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_fast import _ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

_INFO = _ext.info()
needs_ext = pytest.mark.skipif(
    not _INFO["built"], reason=f"compiled extension unavailable: {_INFO['error']}"
)


def op(*args):
    assert _ext.load() is not None, _ext.info()["error"]
    return torch.ops.sam_fast.context_reweight_fwd(*args)


def cu_of(counts, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=dtype)


def formula(F, w, b, counts, shared):
    """The op's definition, computed in F's dtype (float64 gives the oracle)."""
    s = F @ w + b.reshape(())  # [T, P]
    out, lo = [], 0
    for n in counts:
        x, sc = F[lo : lo + n], s[lo : lo + n]
        if shared:
            out.append(torch.einsum("mp,mpd->pd", torch.softmax(sc, 0), x)[None])
        elif n == 1:
            out.append(torch.zeros_like(x))
        else:
            eye = torch.eye(n, dtype=torch.bool)[:, :, None]  # [i, m, 1]: drop m == i
            a = torch.softmax(sc[None].expand(n, n, -1).masked_fill(eye, float("-inf")), 1)
            out.append(torch.einsum("imp,mpd->ipd", a, x))
        lo += n
    return torch.cat(out)


def make_inputs(counts, P, D, dtype, scale=1.0, bias=0.0, seed=0):
    """Features and a weight whose scores F.w have standard deviation ~ `scale`."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(sum(counts), P, D, generator=g).to(dtype)
    w = (torch.randn(D, generator=g) * scale / D**0.5).to(dtype)
    b = torch.tensor(bias, dtype=dtype)
    return F, w, b


# Floor of the error budget, relative to max|oracle|: about two units in the last place of the
# output dtype (fp32: a few, as fp32 scores of magnitude 1e4 are themselves rounded by ~5e-4).
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_within_budget(F, w, b, counts, shared):
    """flash-attention's rule: |op - oracle| <= 2 |torch same dtype - oracle| + small floor."""
    got = op(F, w, b, cu_of(counts), shared)
    assert got.dtype == F.dtype
    assert got.shape == (len(counts) if shared else F.shape[0], *F.shape[1:])
    ref = formula(F.double(), w.double(), b.double(), counts, shared)
    plain = formula(F, w, b, counts, shared)
    err = (got.double() - ref).abs().max().item()
    budget = 2 * (plain.double() - ref).abs().max().item() + FLOOR[F.dtype] * ref.abs().max().item()
    assert err <= budget, f"op error {err:.3g} > budget {budget:.3g}"
    return got


# --------------------------------------------------------------------------- build and loading


@needs_ext
def test_extension_loads_and_matches_running_torch():
    mod = _ext.load()
    assert mod is not None, _INFO["error"]
    info = _ext.info()
    assert info["error"] is None and info["torch_matches"]
    assert mod.built_with_torch == torch.__version__ == info["built_with_torch"]
    assert isinstance(mod.with_cuda, bool) and mod.with_cuda == info["with_cuda"]
    assert Path(info["path"]).is_file()
    assert hasattr(torch.ops.sam_fast, "context_reweight_fwd")


def _run_py(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


def test_disabled_extension_leaves_a_pure_python_sam_fast():
    code = (
        "import sys, sam_fast\n"
        "from sam_fast import _ext\n"
        "assert _ext.load() is None\n"
        "assert 'sam_fast._C' not in sys.modules\n"
        "print(_ext.info()['error'])\n"
    )
    r = _run_py(code, SAM_FAST_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert "disabled by SAM_FAST_DISABLE_EXT" in r.stdout


@needs_ext
def test_extension_built_for_another_torch_is_refused_before_loading():
    code = (
        "import sys, torch\n"
        "real = torch.__version__\n"
        "torch.__version__ = '0.0.1+other'\n"
        "from sam_fast import _ext\n"
        "assert _ext.load() is None\n"
        "assert 'sam_fast._C' not in sys.modules\n"
        "i = _ext.info()\n"
        "assert i['built'] and not i['torch_matches'] and i['built_with_torch'] == real, i\n"
        "print(i['error'])\n"
    )
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert "0.0.1+other" in r.stdout and torch.__version__ in r.stdout


# --------------------------------------------------------------------------- numerics (CPU)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_shapes(dtype, shared):
    """EVA ViT-g features: 257 patches of width 1408; samples of 1, 3 and 17 images."""
    F, w, b = make_inputs([1, 3, 17], 257, 1408, dtype, scale=3.0, bias=0.5)
    assert_within_budget(F, w, b, [1, 3, 17], shared)


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scale", "bias"), [(1.0, 0.0), (100.0, -30.0), (1e4, 0.0), (10.0, 1e4)])
def test_ragged_batches_and_large_scores(dtype, shared, scale, bias):
    """Ragged 1..17 images per sample, odd P and D, scores (or bias) up to 1e4 in magnitude."""
    counts = torch.randint(1, 18, (5,), generator=torch.Generator().manual_seed(int(scale))).tolist()
    counts[0] = 1
    F, w, b = make_inputs(counts, 33, 37, dtype, scale=scale, bias=bias, seed=int(scale) + 1)
    got = assert_within_budget(F, w, b, counts, shared)
    assert torch.isfinite(got).all()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_image_sample_gives_zeros_in_leave_one_out(dtype):
    F, w, b = make_inputs([1, 2, 1], 5, 16, dtype, scale=1e4)
    out = op(F, w, b, cu_of([1, 2, 1]), False)
    assert (out[0] == 0).all() and (out[3] == 0).all()
    torch.testing.assert_close(out[1], F[2]), torch.testing.assert_close(out[2], F[1])
    torch.testing.assert_close(op(F, w, b, cu_of([1, 2, 1]), True)[0], F[0])


@needs_ext
def test_tied_maximum_scores_in_leave_one_out():
    """Two images share the (huge) maximum: excluding either leaves the other dominant."""
    F = torch.randn(3, 3, 4)
    w = torch.zeros(4)
    w[0] = 1.0
    F[:, :, 0] = torch.tensor([5e3, 1e4, 1e4])[:, None]
    out = op(F, w, torch.tensor(0.0), cu_of([3]), False)
    torch.testing.assert_close(out[1], F[2]), torch.testing.assert_close(out[2], F[1])
    torch.testing.assert_close(out[0], (F[1] + F[2]) / 2)


@needs_ext
def test_empty_sample_gives_zeros_in_shared_mode():
    F, w, b = make_inputs([2], 3, 8, torch.float32)
    out = op(F, w, b, torch.tensor([0, 0, 2, 2]), True)
    assert out.shape == (3, 3, 8) and (out[0] == 0).all() and (out[2] == 0).all()


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_layouts_offset_dtypes_and_bias_shapes_do_not_change_the_result(shared):
    counts = [2, 5]
    F, w, b = make_inputs(counts, 9, 40, torch.float32, scale=5.0)
    want = op(F, w, b, cu_of(counts), shared)
    strided = F.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [T, P, D] with P outermost
    assert not strided.is_contiguous()
    wide = torch.cat([F, torch.randn_like(F)], dim=2)[:, :, :40]  # D-slice of a wider tensor
    for got in (
        op(strided, w, b, cu_of(counts), shared),
        op(wide, w, b, cu_of(counts), shared),
        op(F, w, b.reshape(1), cu_of(counts, torch.int32), shared),
        op(F, w.double(), b.double(), cu_of(counts), shared),
        op(F, torch.stack([w, -w], 1)[:, 0], b, cu_of(counts), shared),  # strided weight
    ):
        assert torch.equal(got, want)


@needs_ext
def test_bad_inputs_raise_errors_naming_shapes_and_dtypes():
    F, w, b = make_inputs([2, 1], 3, 8, torch.float32)
    cu = cu_of([2, 1])
    cases = [
        ((F[0], w, b, cu), "features must be [T, P, D]"),
        ((F.long(), w, b, cu), "features dtype"),
        ((F, w[:7], b, cu), "weight must be [D] = [8]"),
        ((F, w, torch.zeros(2), cu), "bias must be a 0-d or [1] tensor"),
        ((F, w, b, cu.float()), "cu_images dtype must be int32 or int64"),
        ((F, w, b, cu[None]), "cu_images must be [B + 1]"),
        ((F, w, b, torch.tensor([0, 1, 2])), "cu_images[-1] must equal T"),
        ((F, w, b, torch.tensor([1, 2, 3])), "cu_images[0] must be 0"),
        ((F, w, b, torch.tensor([0, 2, 1, 3])), "non-decreasing"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(*args, True)


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_opcheck_and_meta_shapes(shared):
    """Schema, FakeTensor (Meta kernel) and AOT dispatch agree with the CPU kernel."""
    F, w, b = make_inputs([3, 1], 5, 8, torch.float32)
    torch.library.opcheck(torch.ops.sam_fast.context_reweight_fwd.default, (F, w, b, cu_of([3, 1]), shared))
    meta = op(F.to("meta"), w.to("meta"), b.to("meta"), cu_of([3, 1]).to("meta"), shared)
    assert meta.shape == (2 if shared else 4, 5, 8) and meta.device.type == "meta"


# --------------------------------------------------------------------------- CUDA sources, no GPU


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    cmd = [nvcc, f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings", f"-I{CSRC}", "-c",
           str(CSRC / source), "-o", str(tmp_path / "out.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"


@pytest.mark.slow
def test_cuda_binding_compiles_against_the_installed_torch_headers(tmp_path):
    """The binding uses only device-generic c10 APIs, so a CPU torch's headers check it too."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DSAM_FAST_WITH_CUDA=1", f"-I{CSRC}",
           *(f"-isystem{p}" for p in include_paths()), str(CSRC / "context_reweight_cuda_binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- CMake op library


@pytest.mark.slow
def test_cmake_builds_a_loadable_op_library():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    build = ROOT / "build" / "cmake"
    cfg = [cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
           f"-DPython_EXECUTABLE={sys.executable}"]
    for cmd in (cfg, [cmake, "--build", str(build), "-j2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    libs = list(build.glob("libsam_fast_ops.*"))
    assert libs, f"no libsam_fast_ops in {build}"
    code = (  # a fresh process without sam_fast._C: the library alone registers the op
        "import torch\n"
        f"torch.ops.load_library({str(libs[0])!r})\n"
        "F = torch.randn(3, 2, 4)\n"
        "out = torch.ops.sam_fast.context_reweight_fwd(F, torch.zeros(4), torch.tensor(0.), torch.tensor([0, 3]), True)\n"
        "torch.testing.assert_close(out[0], F.mean(0))\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_backward_op_meta_shapes_and_checks(shared):
    """sam_fast::context_reweight_bwd: Meta shapes (d features only when asked) and grad checks."""
    _ext.load()
    F, w, b = make_inputs([3, 1], 5, 8, torch.float32)
    rows = 2 if shared else 4
    g = torch.randn(rows, 5, 8)
    bwd = torch.ops.sam_fast.context_reweight_bwd
    for features_grad, dF_shape in ((True, (4, 5, 8)), (False, (0,))):
        dF, dw, db, ds = bwd(g.to("meta"), F.to("meta"), w.to("meta"), b.to("meta"), cu_of([3, 1]).to("meta"),
                             shared, features_grad)
        assert dF.shape == dF_shape and dw.shape == (8,) and db.shape == () and dw.dtype == torch.float32
        assert ds.shape == (0,)  # no given scores: no score gradient
        dF, dw, db, ds = bwd(g, F, w, b, cu_of([3, 1]), shared, features_grad)
        assert dF.shape == dF_shape and torch.isfinite(dw).all()
        s = torch.randn(4, 5)  # given scores: their gradient [T, P], zero weight gradients
        dF, dw, db, ds = bwd(g.to("meta"), F.to("meta"), w.to("meta"), b.to("meta"), cu_of([3, 1]).to("meta"),
                             shared, features_grad, s.to("meta"))
        assert dF.shape == dF_shape and ds.shape == (4, 5) and ds.dtype == torch.float32
        dF, dw, db, ds = bwd(g, F, w.zero_(), b.zero_(), cu_of([3, 1]), shared, features_grad, s)
        assert ds.shape == (4, 5) and torch.isfinite(ds).all() and not dw.any() and not db.any()
    with pytest.raises(RuntimeError, match=re.escape("grad_out must be [")):
        bwd(g[:1], F, w, b, cu_of([3, 1]), shared, True)
