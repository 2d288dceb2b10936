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


def formula(V, s, counts, shared):
    """The op's definition, computed in V's dtype (float64 gives the oracle)."""
    out, lo = [], 0
    for n in counts:
        x, sc = V[lo : lo + n], s[lo : lo + n]
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


def make_inputs(counts, P, D, dtype, scale=1.0, shift=0.0, seed=0):
    """Values [T, P, D] of `dtype` and fp32 scores [T, P] of standard deviation `scale` around `shift`."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(sum(counts), P, D, generator=g).to(dtype)
    s = torch.randn(sum(counts), P, generator=g) * scale + shift
    return V, s


# Floor of the error budget, relative to max|oracle|: about two units in the last place of the
# output dtype.
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_within_budget(V, s, counts, shared):
    """flash-attention's rule: |op - oracle| <= 2 |torch same dtype - oracle| + small floor."""
    got = op(V, s, cu_of(counts), shared)
    assert got.dtype == V.dtype
    assert got.shape == (len(counts) if shared else V.shape[0], *V.shape[1:])
    ref = formula(V.double(), s.double(), counts, shared)
    plain = formula(V, s.to(V.dtype), counts, shared)
    err = (got.double() - ref).abs().max().item()
    budget = 2 * (plain.double() - ref).abs().max().item() + FLOOR[V.dtype] * ref.abs().max().item()
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
    """EVA ViT-g width: 257 patches of width 1408; samples of 1, 3 and 17 images."""
    V, s = make_inputs([1, 3, 17], 257, 1408, dtype, scale=3.0, shift=0.5)
    assert_within_budget(V, s, [1, 3, 17], shared)


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (100.0, -30.0), (1e4, 0.0), (10.0, 1e4)])
def test_ragged_batches_and_large_scores(dtype, shared, scale, shift):
    """Ragged 1..17 images per sample, odd P and D, scores (or their offset) up to 1e4 in magnitude."""
    counts = torch.randint(1, 18, (5,), generator=torch.Generator().manual_seed(int(scale))).tolist()
    counts[0] = 1
    V, s = make_inputs(counts, 33, 37, dtype, scale=scale, shift=shift, seed=int(scale) + 1)
    got = assert_within_budget(V, s, counts, shared)
    assert torch.isfinite(got).all()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_image_sample_gives_zeros_in_leave_one_out(dtype):
    V, s = make_inputs([1, 2, 1], 5, 16, dtype, scale=1e4)
    out = op(V, s, cu_of([1, 2, 1]), False)
    assert (out[0] == 0).all() and (out[3] == 0).all()
    torch.testing.assert_close(out[1], V[2]), torch.testing.assert_close(out[2], V[1])
    torch.testing.assert_close(op(V, s, cu_of([1, 2, 1]), True)[0], V[0])


@needs_ext
def test_tied_maximum_scores_in_leave_one_out():
    """Two images share the (huge) maximum: excluding either leaves the other dominant."""
    V = torch.randn(3, 3, 4)
    s = torch.tensor([5e3, 1e4, 1e4])[:, None].expand(3, 3)
    out = op(V, s, cu_of([3]), False)
    torch.testing.assert_close(out[1], V[2]), torch.testing.assert_close(out[2], V[1])
    torch.testing.assert_close(out[0], (V[1] + V[2]) / 2)


@needs_ext
def test_empty_sample_gives_zeros_in_shared_mode():
    V, s = make_inputs([2], 3, 8, torch.float32)
    out = op(V, s, torch.tensor([0, 0, 2, 2]), True)
    assert out.shape == (3, 3, 8) and (out[0] == 0).all() and (out[2] == 0).all()


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_layouts_and_dtypes_of_offsets_and_scores_do_not_change_the_result(shared):
    counts = [2, 5]
    V, s = make_inputs(counts, 9, 40, torch.float32, scale=5.0)
    want = op(V, s, cu_of(counts), shared)
    strided = V.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [T, P, D] with P outermost
    assert not strided.is_contiguous()
    wide = torch.cat([V, torch.randn_like(V)], dim=2)[:, :, :40]  # D-slice of a wider tensor
    for got in (
        op(strided, s, cu_of(counts), shared),
        op(wide, s, cu_of(counts), shared),
        op(V, s, cu_of(counts, torch.int32), shared),
        op(V, s.double(), cu_of(counts), shared),  # scores are used in fp32
        op(V, s.t().contiguous().t(), cu_of(counts), shared),  # strided scores
    ):
        assert torch.equal(got, want)


@needs_ext
def test_bad_inputs_raise_errors_naming_shapes_and_dtypes():
    V, s = make_inputs([2, 1], 3, 8, torch.float32)
    cu = cu_of([2, 1])
    cases = [
        ((V[0], s, cu), "values must be [T, P, D]"),
        ((V.long(), s, cu), "values dtype"),
        ((V, s[:2], cu), "scores must be [T, P] = [3, 3]"),
        ((V, s.long(), cu), "scores must be floating point"),
        ((V, s.to("meta"), cu), "scores is on meta"),
        ((V, s, cu.float()), "cu_images dtype must be int32 or int64"),
        ((V, s, cu[None]), "cu_images must be [B + 1]"),
        ((V, s, torch.tensor([0, 1, 2])), "cu_images[-1] must equal T"),
        ((V, s, torch.tensor([1, 2, 3])), "cu_images[0] must be 0"),
        ((V, s, torch.tensor([0, 2, 1, 3])), "non-decreasing"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(*args, True)


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_opcheck_and_meta_shapes(shared):
    """Schema, FakeTensor (Meta kernel) and AOT dispatch agree with the CPU kernel."""
    V, s = make_inputs([3, 1], 5, 8, torch.float32)
    torch.library.opcheck(torch.ops.sam_fast.context_reweight_fwd.default, (V, s, cu_of([3, 1]), shared))
    meta = op(V.to("meta"), s.to("meta"), cu_of([3, 1]).to("meta"), shared)
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


@pytest.fixture(scope="module")
def cuda_emu(tmp_path_factory):
    """csrc/context_reweight_cuda.cu built for the CPU emulation (tests/_cuda_emu.py)."""
    import _cuda_emu

    try:
        lib = _cuda_emu.build(CSRC / "context_reweight_cuda.cu", CSRC, tmp_path_factory.mktemp("cuda_emu"))
    except RuntimeError as exc:
        pytest.fail(f"the CUDA source does not build for the CPU emulation: {exc}")
    if lib is None:
        pytest.skip("no C++20 compiler for the CPU emulation")
    return lib


def _emu_call(lib, V, s, counts, shared, g=None):
    """The CUDA launcher's forward (g None) or backward with CPU tensors: out, or (dV, ds)."""
    import ctypes

    ptr = ctypes.c_void_p
    i64 = ctypes.c_int64
    cu = cu_of(counts, torch.int32)
    B, (T, P, D) = len(counts), V.shape
    lib.sam_fast_context_reweight_workspace_floats.restype = i64
    ws = torch.full((lib.sam_fast_context_reweight_workspace_floats(i64(B), i64(T), i64(P), i64(D),
                                                                    int(g is not None)),), float("nan"))
    common = (ptr(s.data_ptr()), ptr(cu.data_ptr()), 0, i64(B), i64(T), i64(P), i64(D), int(shared),
              ptr(ws.data_ptr()))
    if g is None:
        out = torch.full((B if shared else T, P, D), float("nan"))
        err = lib.sam_fast_context_reweight_fwd_cuda(ptr(V.data_ptr()), 0, *common, ptr(out.data_ptr()), None)
        assert err == 0
        return out
    dV, ds = torch.full_like(V, float("nan")), torch.zeros(T, P)
    err = lib.sam_fast_context_reweight_bwd_cuda(ptr(g.data_ptr()), ptr(V.data_ptr()), 0, *common,
                                                 ptr(dV.data_ptr()), ptr(ds.data_ptr()), None)
    assert err == 0
    return dV, ds


@pytest.mark.parametrize("shared", [False, True], ids=["leave_one_out", "shared"])
@pytest.mark.parametrize(("counts", "D"), [([1, 2, 3, 7, 16], 300), ([16], 130), ([2, 1, 2], 1100)],
                         ids=["n1-2-3-7-16_D300", "n16_D130", "n2-1-2_D1100"])
def test_cuda_kernels_match_the_oracle_under_cpu_emulation(cuda_emu, counts, D, shared):
    """The CUDA kernels (fp32) run thread by thread on the CPU (tests/_cuda_emu.py): forward and
    both gradients against the float64 formula, for samples of 1 to 16 images (one register chunk
    of NB images or two) and channel widths that leave a ragged last channel block; a second run
    is bitwise equal."""
    P = 2
    V, s = make_inputs(counts, P, D, torch.float32, scale=3.0, shift=0.5, seed=len(counts))
    g = torch.randn(len(counts) if shared else V.shape[0], P, D, generator=torch.Generator().manual_seed(1))
    out = _emu_call(cuda_emu, V, s, counts, shared)
    dV, ds = _emu_call(cuda_emu, V, s, counts, shared, g)
    V64, s64 = V.double().requires_grad_(), s.double().requires_grad_()
    ref = formula(V64, s64, counts, shared)
    ref_dV, ref_ds = torch.autograd.grad(ref, (V64, s64), g.double())
    for name, got, want in (("out", out, ref.detach()), ("dV", dV, ref_dV), ("ds", ds, ref_ds)):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{name}: error {err:.3g}"
    again = _emu_call(cuda_emu, V, s, counts, shared, g)
    assert torch.equal(again[0], dV) and torch.equal(again[1], ds)


@pytest.mark.parametrize("shared", [False, True], ids=["leave_one_out", "shared"])
def test_cuda_kernels_non_finite_columns_under_cpu_emulation(cuda_emu, shared):
    """A NaN score (in the second chunk of a 9-image sample) and an inf score (one-image sample)
    make exactly their columns NaN, outputs and both gradients."""
    counts, P, D = [9, 1, 2], 3, 200
    V, s = make_inputs(counts, P, D, torch.float32, scale=2.0, seed=4)
    s[7, 1] = float("nan")
    s[9, 2] = float("inf")
    bad = torch.zeros(sum(counts), P, dtype=torch.bool)
    bad[:9, 1] = bad[9, 2] = True
    bad_out = torch.stack([bad[:9].any(0), bad[9], bad[10:].any(0)]) if shared else bad
    g = torch.randn(len(counts) if shared else sum(counts), P, D)
    out = _emu_call(cuda_emu, V, s, counts, shared)
    dV, ds = _emu_call(cuda_emu, V, s, counts, shared, g)
    assert torch.isnan(out[bad_out]).all() and torch.isfinite(out[~bad_out]).all()
    assert torch.isnan(dV[bad]).all() and torch.isfinite(dV[~bad]).all()
    assert torch.isnan(ds[bad]).all() and torch.isfinite(ds[~bad]).all()
    want = formula(V.double(), torch.where(bad, 0.0, s).double(), counts, shared)
    torch.testing.assert_close(out[~bad_out].double(), want[~bad_out], rtol=1e-5, atol=1e-5)


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
        "V = torch.randn(3, 2, 4)\n"
        "out = torch.ops.sam_fast.context_reweight_fwd(V, torch.zeros(3, 2), torch.tensor([0, 3]), True)\n"
        "torch.testing.assert_close(out[0], V.mean(0))\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_ext
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "leave_one_out"])
def test_backward_op_meta_shapes_and_checks(shared):
    """sam_fast::context_reweight_bwd: Meta shapes (d values only when asked, d scores always)
    and grad checks."""
    _ext.load()
    V, s = make_inputs([3, 1], 5, 8, torch.float32)
    rows = 2 if shared else 4
    g = torch.randn(rows, 5, 8)
    bwd = torch.ops.sam_fast.context_reweight_bwd
    for values_grad, dV_shape in ((True, (4, 5, 8)), (False, (0,))):
        dV, ds = bwd(g.to("meta"), V.to("meta"), s.to("meta"), cu_of([3, 1]).to("meta"), shared, values_grad)
        assert dV.shape == dV_shape and ds.shape == (4, 5) and ds.dtype == torch.float32
        dV, ds = bwd(g, V, s, cu_of([3, 1]), shared, values_grad)
        assert dV.shape == dV_shape and ds.shape == (4, 5) and torch.isfinite(ds).all()
    with pytest.raises(RuntimeError, match=re.escape("grad_out must be [")):
        bwd(g[:1], V, s, cu_of([3, 1]), shared, True)
