"""Ahead-of-time compilation of the library's Triton launches for real NVIDIA targets, no GPU needed.

Used by tests/test_triton_gpu_compile.py, as two subprocesses:

``python _triton_aot.py capture OUT.json [full]`` (under TRITON_INTERPRET=1, where the kernels are
``InterpretedFunction`` objects): runs `_scenarios` (the public ops forward and backward, the tiny
model) with ``SAM_FAST_BACKEND=triton`` inside `gpu_launch_configs` (the launchers pick the block
sizes and warps they use on a GPU, not the interpreter's) and `capture` (every launch of a kernel
defined in ``sam_fast`` is recorded, not executed: kernel, positional and keyword arguments,
options such as ``num_warps``; a tensor is recorded as its dtype and whether its data pointer is
16-byte aligned, anything else as its value). Nothing here names a kernel argument. Launches
dedupe on `specialization_key`: what Triton's JIT would compile for them, computed by the JIT's
own binder (argument types, the value-1 and divisible-by-16 specialisations, constexprs, options).

``python _triton_aot.py compile JOBS.json RESULTS.json WORKERS`` (without TRITON_INTERPRET, so
``@triton.jit`` gives real ``JITFunction`` objects): each launch is re-bound exactly as
``JITFunction.run`` binds it (stand-in CPU tensors of the recorded dtype and alignment) and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` through
ttir, ttgir, LLVM IR and PTX to a cubin by ``ptxas``. No CUDA driver is involved: the NVIDIA
backend needs only the target and a ``ptxas`` (Triton's bundled one, or TRITON_PTXAS_PATH).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
import traceback

KERNEL_PACKAGE = "sam_fast"  # kernels of sam_fast._kernels, or anywhere in the library
LAUNCHER_PACKAGE = "sam_fast.ops"


# -- argument encoding (capture subprocess -> compile subprocess) ------------------------------

def encode(x):
    """JSON form of one kernel argument; raises TypeError for a kind it does not know."""
    import torch

    if isinstance(x, torch.Tensor):
        return {"tensor": str(x.dtype).removeprefix("torch."), "align16": x.data_ptr() % 16 == 0}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return {"tuple": [encode(v) for v in x]}
    import triton.language as tl

    if isinstance(x, tl.constexpr):
        return encode(x.value)
    if isinstance(x, tl.dtype):
        return {"tl_dtype": x.name}
    if isinstance(x, torch.dtype):
        return {"torch_dtype": str(x).removeprefix("torch.")}
    raise TypeError(f"cannot encode a kernel argument of type {type(x).__name__}: {x!r} (extend _triton_aot.encode)")


def decode(x):
    """Inverse of `encode`: tensors become small CPU tensors of that dtype and alignment."""
    import torch

    if isinstance(x, dict):
        if "tensor" in x:
            dtype = getattr(torch, x["tensor"])
            t = torch.empty(64, dtype=dtype)  # the CPU allocator aligns to >= 64 bytes
            if not x["align16"]:
                t = t[1:]
            assert (t.data_ptr() % 16 == 0) == x["align16"]
            return t
        if "tuple" in x:
            return tuple(decode(v) for v in x["tuple"])
        if "tl_dtype" in x:
            import triton.language as tl

            return tl.dtype(x["tl_dtype"])
        if "torch_dtype" in x:
            return getattr(torch, x["torch_dtype"])
    return x


# -- capture ------------------------------------------------------------------------------------

@contextlib.contextmanager
def capture(execute: bool = False):
    """Record every launch of a kernel defined in ``sam_fast`` made inside the block (interpreter).

    Yields the list the launches are appended to: dicts with module, name, args, kwargs (JSON).
    With ``execute=False`` the kernel body is not interpreted (outputs stay uninitialised): only
    which launches the library makes matters here, and the interpreter costs milliseconds per
    program.
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        module = getattr(fn, "__module__", "") or ""
        if module == KERNEL_PACKAGE or module.startswith(KERNEL_PACKAGE + "."):
            launches.append({
                "module": fn.__module__,
                "name": fn.__name__,
                "args": [encode(a) for a in args],
                "kwargs": {k: encode(v) for k, v in sorted(kwargs.items())},
            })
            if not execute:
                return None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _launcher_modules():
    pkg = importlib.import_module(LAUNCHER_PACKAGE)
    mods = [pkg]
    for info in pkgutil.iter_modules(pkg.__path__):
        mods.append(importlib.import_module(f"{LAUNCHER_PACKAGE}.{info.name}"))
    return mods


@contextlib.contextmanager
def gpu_launch_configs():
    """Make the launchers choose their GPU launch configuration while running under the interpreter.

    The launchers pick bigger blocks under the interpreter (each program costs milliseconds
    there); those configurations never run on a GPU. By convention a launcher asks either a
    zero-argument function ``_interpreting()`` or passes a parameter named ``interpret`` to its
    block-size helper; inside this block the first returns False and the second is forced to
    False. Yields the list of hooks patched ("module.function"), empty when the convention is gone.
    """
    patched: list[tuple[object, str, object]] = []
    names: list[str] = []
    for mod in _launcher_modules():
        for name, obj in list(vars(mod).items()):
            if not inspect.isfunction(obj) or obj.__module__ != mod.__name__:
                continue
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if name == "_interpreting" and not params:
                replacement = lambda: False  # noqa: E731
            elif "interpret" in params:
                sig = inspect.signature(obj)

                def replacement(*a, _f=obj, _sig=sig, **k):
                    bound = _sig.bind(*a, **k)
                    bound.arguments["interpret"] = False
                    return _f(*bound.args, **bound.kwargs)

                functools.update_wrapper(replacement, obj)
            else:
                continue
            patched.append((mod, name, obj))
            names.append(f"{mod.__name__}.{name}")
            setattr(mod, name, replacement)
    try:
        yield names
    finally:
        for mod, name, obj in reversed(patched):
            setattr(mod, name, obj)


# -- binding, as JITFunction.run does it --------------------------------------------------------

def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _jit_function(launch):
    """The real JITFunction of a launch: the module's object outside the interpreter, a JITFunction
    built from the interpreted function's Python source inside it."""
    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(launch["module"]), launch["name"])
    if isinstance(obj, JITFunction):
        return obj
    return JITFunction(obj.fn)


def bind(launch, arch: int = 80):
    """(fn, backend, options, signature, constexprs, attrs) exactly as JITFunction.run computes them."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch)
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [decode(a) for a in launch["args"]]
    kwargs = {k: decode(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return fn, backend, options, signature, constexprs, attrs


def specialization_key(launch, with_attrs: bool = True) -> str:
    """What the JIT compiles for this launch: kernel, argument types, constexprs (the value-1
    specialisations included), options and, ``with_attrs``, the divisible-by-16 hints."""
    _, _, options, signature, constexprs, attrs = bind(launch)
    key = {
        "kernel": f"{launch['module']}.{launch['name']}",
        "signature": signature,
        "constexprs": {str(k): repr(v) for k, v in sorted(constexprs.items())},
        "options": {k: repr(v) for k, v in sorted(options.__dict__.items())},
    }
    if with_attrs:
        key["attrs"] = {str(k): repr(v) for k, v in sorted(attrs.items())}
    return json.dumps(key, sort_keys=True)


def describe(launch) -> str:
    """One line: kernel name, the non-constexpr argument types, constexprs and launch options."""
    _, _, options, signature, constexprs, attrs = bind(launch)
    fn = _jit_function(launch)
    names = fn.arg_names
    types = ",".join(v for v in signature.values() if v != "constexpr")
    consts = ",".join(f"{names[k[0]]}={v!r}" for k, v in sorted(constexprs.items()))
    return f"{launch['name']}({types}; {consts}; num_warps={options.num_warps}, num_stages={options.num_stages})"


# -- compilation (subprocess, no TRITON_INTERPRET) -----------------------------------------------

def compile_launch(launch, arch: int) -> dict:
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    fn, _, options, signature, constexprs, attrs = bind(launch, arch)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(arch),
                            options=options.__dict__)
    asm = kernel.asm
    ptx = asm.get("ptx") or ""
    return {
        "ptx_bytes": len(ptx),
        "cubin_bytes": len(asm.get("cubin") or b""),
        "ptx_target": next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), None),
        "shared": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _compile_job(job) -> dict:
    entry = {"id": job["id"], "arch": job["arch"]}
    try:
        entry.update(ok=True, **compile_launch(job["launch"], job["arch"]))
    except BaseException as exc:  # noqa: BLE001  (reported: the test fails on it)
        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return entry


def compile_main(jobs_path: str, results_path: str, workers: int) -> int:
    """Compile every job of `jobs_path` ([{id, arch, launch}]), `workers` processes, results to
    `results_path` (rewritten after each job, so a timeout still shows what was done)."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile without the interpreter"
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []

    def done(entry):
        results.append(entry)
        with open(results_path, "w") as f:
            json.dump(results, f)

    if workers <= 1:
        for job in jobs:
            done(_compile_job(job))
        return 0
    import multiprocessing

    # Forked from this light process (no torch/triton imported yet); each worker imports them once.
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=None) as pool:
        for entry in pool.imap_unordered(_compile_job, jobs, chunksize=1):
            done(entry)
    return 0


# -- the launches to capture (run by `capture_main` under TRITON_INTERPRET=1) --------------------

def _scenarios(full: bool):
    """(name, thunk) pairs calling the public ops forward and backward the way the library does.

    Shapes are the model's (Q-former d = 64, 32 query rows, 257 image tokens, vision width 1408)
    plus small odd ones; kernels are not executed while capturing, so sizes cost nothing. The
    default set covers every kernel with every dtype and every flag at least once; ``full`` takes
    the product.
    """
    import torch

    from sam_fast.ops import context_reweight, cross_attention, cross_attention_streams, rms_norm, swiglu

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    dtypes = (f32, f16, bf16)

    def g(*shape, dtype=f32, grad=True):
        return torch.randn(*shape).to(dtype).requires_grad_(grad)

    def backward(out):
        out.backward(torch.ones_like(out))

    # context_reweight(values [T,P,D], scores [T,P], cu_images, mode); the model's scores are fp32
    def reweight(dtype, mode, P, D, scores=f32, values_grad=True, scores_grad=True, cu_dtype=torch.int32,
                 counts=(1, 3, 2)):
        def run():
            T = sum(counts)
            V = g(T, P, D, dtype=dtype, grad=values_grad)
            s = g(T, P, dtype=scores, grad=scores_grad)
            cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=cu_dtype)
            out = context_reweight(V, s, cu, mode)
            if out.requires_grad:
                backward(out)
        return run

    # attention: the model's K/V are strided views of one GEMM output [R, Lk, n_cross*2*H*d]; one
    # extra column here also gives a row stride that is not a multiple of 16 bytes
    def kv_views(R, H, Lk, d, dtype, extra=1):
        buf = g(R, Lk, 2 * H * d + extra, dtype=dtype)
        k = buf[..., : H * d].unflatten(-1, (H, d)).transpose(1, 2)
        v = buf[..., H * d: 2 * H * d].unflatten(-1, (H, d)).transpose(1, 2)
        return k, v

    def attention(dtype, bias=None, Lq=32, Lk=257, d=64, H=2, N=3, strided=False):
        def run():
            q = g(N, H, Lq, d, dtype=dtype)
            if strided:
                k, v = kv_views(N, H, Lk, d, dtype)
            else:
                k, v = g(N, H, Lk, d, dtype=dtype), g(N, H, Lk, d, dtype=dtype)
            ab = None
            if bias == "rows":
                ab = torch.zeros(N, 1, 1, Lk, dtype=dtype)
                ab[0, ..., Lk // 2:] = torch.finfo(dtype).min
            elif bias == "broadcast":
                ab = torch.zeros(1, 1, 1, Lk, dtype=dtype)
            backward(cross_attention(q, k, v, ab))
        return run

    def streams(dtype, second="rows", Lq=32, Lk=257, d=64, H=2, S=2, n2=3, R2=2):
        def run():
            q = g(S + n2, H, Lq, d, dtype=dtype)
            k, v = kv_views(S, H, Lk, d, dtype)
            kw = {}
            if second is None:
                q = g(S, H, Lq, d, dtype=dtype)
                backward(cross_attention_streams(q, k, v))
                return
            if second == "rows":
                k2, v2 = kv_views(n2, H, Lk, d, dtype)
            elif second == "rows2":
                k2, v2 = kv_views(R2, H, Lk, d, dtype)
                kw["rows2"] = torch.tensor([i % R2 for i in range(n2)])
            elif second == "mix":
                k2, v2 = kv_views(R2 + 2, H, Lk, d, dtype)
                M = 3
                index = torch.tensor([[(j + s) % (R2 + 2) for s in range(M)] for j in range(n2)], dtype=torch.int32)
                weight = torch.softmax(torch.randn(n2, M, Lk), 1).requires_grad_()
                kw["mix"] = (index, weight)
            backward(cross_attention_streams(q, k, v, k2, v2, **kw))
        return run

    def model(context_mode, autocast=None):
        def run():
            from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam

            m = randomize_guidance(tiny_sam(context_mode=context_mode, interaction_layers=(1, 3))).train(False)
            feats, ids, mask = ragged_batch(m, [1, 3, 2], pad_sample=1)
            ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                out = m.encode_images(image_features=feats, image_counts=[1, 3, 2], qformer_input_ids=ids,
                                      qformer_attention_mask=mask)
            backward(out.float())
        return run

    has_mix = "mix" in inspect.signature(cross_attention_streams).parameters
    s = []
    modes = ("leave_one_out", "shared")
    # -- context_reweight: every dtype x mode (forward, backward with values grad)
    for dt in dtypes:
        for mode in modes:
            s.append((f"context_reweight {dt} {mode} P=5 D=24", reweight(dt, mode, 5, 24)))
    # model widths (vision 1408, the K/V of the cross layers 1536), an odd width; bf16 scores, no
    # values grad (frozen K/V), int64 offsets, one image
    for dt in (dtypes if full else (f32, bf16)):
        for mode in modes:
            s.append((f"context_reweight {dt} {mode} P=257 D=1408", reweight(dt, mode, 257, 1408)))
            s.append((f"context_reweight {dt} {mode} P=257 D=1536", reweight(dt, mode, 257, 1536)))
    s.append(("context_reweight fp32 odd width D=1537", reweight(f32, "leave_one_out", 257, 1537)))
    s.append(("context_reweight fp16 bf16 scores, int64 offsets",
              reweight(f16, "leave_one_out", 7, 40, scores=bf16, cu_dtype=torch.int64)))
    s.append(("context_reweight bf16 values without grad", reweight(bf16, "shared", 9, 33, values_grad=False)))
    for mode in modes:  # a mid width (one channel block of 256)
        s.append((f"context_reweight fp16 {mode} P=257 D=200", reweight(f16, mode, 257, 200)))
    # the 7B model's merged K/V (6 cross layers x K, V x 768 = 9216 channels, 30 images in 8
    # samples: NB 4) and a lone 16-image sample (NB 16, the biggest register chunk)
    seven_b = (5, 4, 4, 4, 4, 3, 3, 3)
    for dt in (dtypes if full else (f32, bf16)):
        for mode in modes:
            s.append((f"context_reweight {dt} {mode} 7B K/V T=30 D=9216",
                      reweight(dt, mode, 257, 9216, scores_grad=mode == "leave_one_out", counts=seven_b)))
    s.append(("context_reweight fp32 one 16-image sample", reweight(f32, "leave_one_out", 257, 1408, counts=(16,))))
    if full:
        s.append(("context_reweight fp32 D=8192", reweight(f32, "leave_one_out", 3, 8192)))
        for dt in dtypes:
            for mode in modes:
                s.append((f"context_reweight {dt} {mode} counts=(1,)", reweight(dt, mode, 5, 24, counts=(1,))))
                s.append((f"context_reweight {dt} {mode} no values grad",
                          reweight(dt, mode, 5, 24, values_grad=False)))
                s.append((f"context_reweight {dt} {mode} no scores grad",
                          reweight(dt, mode, 5, 24, scores_grad=False)))
    # -- attention at the model's sizes: cross (32 x 257), self (32 queries + 16 text rows, padding
    # bias), both streams with strided K/V; each dtype, each of HAS_BIAS / HAS_ROWS2 / HAS_MIX
    s.append(("cross_attention fp32 32x257 d=64 padding bias", attention(f32, "rows")))
    # the largest head dim the dispatcher accepts (256)
    s.append(("cross_attention_streams fp16 32x257 d=256 gathered rows2", streams(f16, "rows2", d=256)))
    s.append(("cross_attention bf16 self 48x48 d=64 padding bias", attention(bf16, "rows", Lq=48, Lk=48)))
    if has_mix:
        s.append(("cross_attention_streams bf16 32x257 d=64 mix", streams(bf16, "mix")))
    if full:
        for dt in dtypes:
            for bias in (None, "rows", "broadcast"):
                for Lq, Lk in ((32, 257), (48, 48), (8, 21)):
                    s.append((f"cross_attention {dt} {Lq}x{Lk} bias={bias}", attention(dt, bias, Lq=Lq, Lk=Lk)))
            s.append((f"cross_attention {dt} d=24 strided K/V", attention(dt, None, Lq=8, Lk=21, d=24, strided=True)))
            for second in (None, "rows", "rows2") + (("mix",) if has_mix else ()):
                s.append((f"cross_attention_streams {dt} second={second}", streams(dt, second)))
            for d in (8, 16, 128, 256):
                s.append((f"cross_attention {dt} d={d}", attention(dt, "rows", d=d)))
    # -- the frozen LLaMA's RMSNorm / SwiGLU (sam_fast.ops.llama): the 7B width 4096 and FFN 11008
    # in every dtype, the scaled config's 512; the weight-gradient variant; a bf16 input with an fp32 weight
    def norm(dtype, D, rows=6, weight_grad=False, wdtype=None):
        def run():
            backward(rms_norm(g(rows, D, dtype=dtype), g(D, dtype=wdtype or dtype, grad=weight_grad), 1e-6))
        return run

    def act(dtype, n=11008, rows=3):
        def run():
            backward(swiglu(g(rows, n, dtype=dtype), g(rows, n, dtype=dtype)))
        return run

    for dt in dtypes:
        s.append((f"rms_norm {dt} D=4096", norm(dt, 4096)))
        s.append((f"swiglu {dt} 3x11008", act(dt)))
    s.append(("rms_norm fp32 D=512 weight grad", norm(f32, 512, weight_grad=True)))
    s.append(("rms_norm bf16 x fp32 weight D=4096 weight grad", norm(bf16, 4096, weight_grad=True, wdtype=f32)))
    if full:
        for dt in dtypes:
            s.append((f"rms_norm {dt} D=16384 (the limit)", norm(dt, 16384)))
            s.append((f"rms_norm {dt} D=40 weight grad", norm(dt, 40, weight_grad=True)))
    # -- the tiny model end to end (its own layouts: strided K/V, head dim 8)
    for mode in modes:
        s.append((f"model encode_images {mode}", model(mode)))
    if full:
        s.append(("model encode_images leave_one_out bf16 autocast", model("leave_one_out", torch.bfloat16)))
    return s


def capture_main(out_path: str, full: bool) -> int:
    """Run the scenarios under the interpreter (kernels not executed) with the launchers' GPU
    configurations; write {hooks, launches, errors, specs: [{key, launch, describe, origins}]}.
    Launches dedupe on `specialization_key`; by default launches differing only in alignment
    hints count as one (the first is compiled), ``full`` keeps them apart."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "capture under TRITON_INTERPRET=1"
    os.environ["SAM_FAST_BACKEND"] = "triton"
    import torch

    torch.manual_seed(0)
    specs: dict[str, dict] = {}
    errors = []
    n_launches = 0
    with gpu_launch_configs() as hooks, capture(execute=False) as launches:
        for name, run in _scenarios(full):
            start = len(launches)
            try:
                run()
            except Exception as exc:  # noqa: BLE001  (reported: the test fails on it)
                errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                continue
            for launch in launches[start:]:
                key = specialization_key(launch, with_attrs=full)
                spec = specs.setdefault(key, {"key": key, "launch": launch, "describe": describe(launch),
                                              "origins": []})
                if name not in spec["origins"]:
                    spec["origins"].append(name)
        n_launches = len(launches)
    with open(out_path, "w") as f:
        json.dump({"hooks": hooks, "launches": n_launches, "errors": errors, "kernels": defined_kernels(),
                   "specs": list(specs.values())}, f)
    return 0


def defined_kernels() -> list[str]:
    """"module.name" of every public (no leading underscore) ``@triton.jit`` function in the modules
    of ``sam_fast._kernels``: the kernels the launchers launch (device helpers are private)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module("sam_fast._kernels")
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, (InterpretedFunction, JITFunction)) and not name.startswith("_") \
                    and getattr(obj.fn, "__module__", None) == mod.__name__:
                found.append(f"{mod.__name__}.{name}")
    return sorted(found)


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        sys.exit(capture_main(sys.argv[2], full=len(sys.argv) > 3 and sys.argv[3] == "full"))
    sys.exit(compile_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
