"""Every Triton kernel launch the library makes compiles for real NVIDIA GPUs, without a GPU.

The rest of the suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts code that
the real compiler rejects (dot blocks under 16, dtype mismatches, non-constexpr globals,
unsupported ops...). Here:

1. Capture (a subprocess under the interpreter, ``tests/_triton_aot.py capture``): the public
   ops (`context_reweight`, `cross_attention`, `cross_attention_streams`, forward and backward,
   fp32/fp16/bf16, with and without bias, rows2, a mixing plan, ...) and the tiny model's
   ``encode_images`` run with ``SAM_FAST_BACKEND=triton`` while every launch of a
   ``sam_fast._kernels`` kernel is recorded (kernels not executed) with the launch configuration
   the launchers choose on a GPU (`_triton_aot.gpu_launch_configs`: their ``_interpreting()`` is
   False and an ``interpret`` argument of a block-size helper is forced to False; the interpreter's
   own bigger blocks never run on a GPU). Launches reduce to what Triton's JIT would compile for them
   (argument types, value-1 / divisible-by-16 specialisations, constexprs, num_warps...) and
   dedupe. Nothing here names a kernel argument: signature changes are picked up.
2. Compile (a subprocess without the interpreter, one worker per CPU up to 8, fresh Triton cache): each distinct
   specialisation with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   for sm_80 and sm_90, through ttir, ttgir, LLVM IR and PTX to a cubin by ``ptxas``. No CUDA
   driver is needed, only Triton's NVIDIA backend and a ptxas (Triton's bundled one, as on a GPU
   machine; else TRITON_PTXAS_PATH or one on PATH).
3. Assert: the capture found launches (never a vacuous pass) of every public ``@triton.jit``
   function of ``sam_fast._kernels``; every launch compiled, with a non-empty PTX for the right
   target and cubin, and shared memory within the architecture's per-block limit (a bigger
   kernel compiles but fails to launch). Failures are grouped by the compiler's exact message.

Skipped only without triton's NVIDIA backend or a ptxas. ``SAM_FAST_AOT_FULL=1`` captures the
full product of dtypes, flags and shapes (minutes) instead of the default covering set (every
kernel, dtype and flag at least once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HELPER = HERE / "_triton_aot.py"
ARCHS = (80, 90)
# cudaDevAttrMaxSharedMemoryPerBlockOptin of A100 (sm_80) and H100 (sm_90): Triton refuses to
# load a kernel needing more (OutOfResources). sm_86/sm_89 parts allow 99 KiB (reported only).
MAX_SHARED = {80: 166912, 90: 232448}
SMALL_PART_SHARED = 101376
FULL = os.environ.get("SAM_FAST_AOT_FULL") == "1"
WORKERS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _toolchain() -> tuple[dict[str, str], str | None]:
    """(extra environment for the compile subprocess, skip reason or None)."""
    try:
        from triton import knobs
        from triton.backends import backends
    except Exception as exc:  # noqa: BLE001
        return {}, f"triton not importable: {type(exc).__name__}: {exc}"
    if "nvidia" not in backends:
        return {}, f"triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        knobs.nvidia.ptxas.path  # noqa: B018  (TRITON_PTXAS_PATH, else the one shipped with triton)
        return {}, None
    except RuntimeError:
        pass
    for cand in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas", "/usr/local/bin/ptxas"):
        if cand and os.access(cand, os.X_OK):
            return {"TRITON_PTXAS_PATH": cand}, None
    return {}, "no ptxas: neither triton's bundled one, TRITON_PTXAS_PATH, nor one on PATH"


def _run(args, env, timeout, what):
    proc = subprocess.run([sys.executable, str(HELPER), *args], env=env, cwd=HERE.parent, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{what} subprocess failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Capture, dedupe and compile; returns {captured, specs, results, seconds}."""
    extra_env, skip = _toolchain()
    if skip:
        pytest.skip(skip)
    tmp = tmp_path_factory.mktemp("triton_aot")
    t0 = time.perf_counter()

    env = dict(os.environ, TRITON_INTERPRET="1", SAM_FAST_BACKEND="triton")
    captured_path = tmp / "captured.json"
    _run(["capture", str(captured_path)] + (["full"] if FULL else []), env, 600, "capture")
    captured = json.loads(captured_path.read_text())
    t_capture = time.perf_counter() - t0

    specs = captured["specs"]
    jobs = [{"id": i, "arch": arch, "launch": spec["launch"]} for i, spec in enumerate(specs) for arch in ARCHS]
    # the slowest first (the attention backward kernels), so the two workers finish together
    jobs.sort(key=lambda j: ("bwd" not in j["launch"]["name"], "attn" not in j["launch"]["name"]))
    jobs_path, results_path = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env, TRITON_CACHE_DIR=str(tmp / "cache"))  # fresh cache: everything really compiles
    env.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # compile as a default Triton would
    if jobs:
        _run(["compile", str(jobs_path), str(results_path), str(WORKERS)], env, 1800 if FULL else 600, "compile")
    results = json.loads(results_path.read_text()) if jobs else []
    seconds = time.perf_counter() - t0

    by_spec: dict[int, dict[int, dict]] = {}
    for r in results:
        by_spec.setdefault(r["id"], {})[r["arch"]] = r
    lines = [f"captured {captured['launches']} launches -> {len(specs)} distinct specialisations in "
             f"{t_capture:.1f} s; compiled {len(results)} (x{len(ARCHS)} archs) in {seconds - t_capture:.1f} s "
             f"with {WORKERS} worker(s); GPU-config hooks: {captured['hooks']}"]
    for i, spec in enumerate(specs):
        cells = []
        for arch in ARCHS:
            r = by_spec.get(i, {}).get(arch)
            if r is None:
                cells.append(f"sm_{arch}: not compiled")
            elif r["ok"]:
                cells.append(f"sm_{arch}: cubin {r['cubin_bytes']} B, smem {r['shared']} B, {r['seconds']} s")
            else:
                cells.append(f"sm_{arch}: FAILED")
        lines.append(f"  {spec['describe']}  [{'; '.join(cells)}]  <- {spec['origins'][0]}")
    print("\n".join(lines))
    return {"captured": captured, "specs": specs, "results": by_spec, "seconds": seconds}


def test_launches_were_captured(aot):
    captured = aot["captured"]
    assert not captured["errors"], "scenarios failed while capturing:\n" + "\n".join(captured["errors"])
    assert captured["hooks"], (
        "no launcher exposes its GPU launch configuration (a `_interpreting()` function or an `interpret` "
        "parameter in sam_fast.ops.*): the captured launches would use the interpreter's block sizes, which "
        "never run on a GPU; update _triton_aot.gpu_launch_configs")
    assert aot["specs"], "no Triton kernel launch was captured: the test would pass vacuously"
    launched = {f"{s['launch']['module']}.{s['launch']['name']}" for s in aot["specs"]}
    missing = sorted(set(captured["kernels"]) - launched)
    assert not missing, (
        f"kernels never launched by the capture scenarios, so not compiled here: {missing}; add a call that "
        f"reaches them to _triton_aot._scenarios (a device helper should have a leading underscore)")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_every_launch_compiles_to_a_cubin(aot, arch):
    assert aot["specs"], "no Triton kernel launch was captured: nothing to compile"
    problems: dict[str, list[str]] = {}  # what went wrong (exact compiler text) -> the launches
    for i, spec in enumerate(aot["specs"]):
        r = aot["results"].get(i, {}).get(arch)
        if r is None:
            why = "not compiled (the compile subprocess stopped early?)"
        elif not r["ok"]:
            why = r["error"]
        elif not (r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0):
            why = f"empty PTX ({r['ptx_bytes']} B) or cubin ({r['cubin_bytes']} B)"
        elif not (r["ptx_target"] or "").startswith(f"sm_{arch}"):
            why = f"PTX .target {r['ptx_target']}, expected sm_{arch}"
        elif r["shared"] > MAX_SHARED[arch]:
            why = (f"needs {r['shared']} B of shared memory, sm_{arch} allows {MAX_SHARED[arch]} B per block: "
                   f"compiles but cannot launch")
        else:
            continue
        problems.setdefault(why, []).append(f"{spec['describe']}  <- {', '.join(spec['origins'])}")
    bad = sum(len(v) for v in problems.values())
    assert not problems, f"{bad} of {len(aot['specs'])} kernel specialisations fail for sm_{arch}:\n\n" + "\n\n".join(
        f"{len(launches)} launch(es):\n  " + "\n  ".join(launches) + f"\nerror:\n{why}"
        for why, launches in problems.items())
    big = [s["describe"] for i, s in enumerate(aot["specs"])
           if aot["results"][i][arch]["shared"] > SMALL_PART_SHARED]
    if big:
        print(f"sm_{arch}: {len(big)} kernels need more than {SMALL_PART_SHARED} B of shared memory "
              f"(would not launch on sm_86/sm_89 parts): " + "; ".join(big))
