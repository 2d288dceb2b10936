"""One prepared, offline check of everything in sam_fast that needs a GPU (``make gpu-check``).

    python bench/gpu_check.py                # on a CUDA machine: build, tests, model checks, benchmarks
    python bench/gpu_check.py --dry-run      # on a CPU: the same sections at toy sizes (part of the tests)

Sections, each with its own time budget (seconds; 8 minutes in all on an H100-class GPU):

1. ``build`` (180): ``pip install --no-build-isolation --no-deps --no-index -e .`` against the
   machine's own torch, the CUDA extension included (MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST =
   this GPU's arch unless set), then prints ``sam_fast._ext.info()``. ``--dry-run`` / ``--no-build``
   skip the compile and only print the info.
2. ``tests`` (120): pytest on the tests that run on CUDA (re-weighting Triton fwd + bwd, the fused
   cross-attention streams with the in-kernel leave_one_out mix, the fused loss, the fused LLaMA
   kernels, encode_images through the Triton kernels, no device sync), TRITON_INTERPRET unset.
   ``--dry-run`` only collects them (the node ids exist).
3. ``model_checks`` (60): the re-weighting op on every device backend (triton, cuda) against a
   float64 oracle, fwd + bwd; a tiny SAM's ``encode_images`` against
   `sam_fast.reference.reference_encode_images` in both context modes, fp32, bf16 and fp16; the
   packed training step against ``packing=False`` (loss and trainable gradients); ``torch.compile``
   over ``encode_images`` (GPU only). The error-budget rule throughout: the error against a float64
   oracle is at most twice the plain PyTorch computation's error in the same dtype, plus a floor.
4. ``benchmarks`` (120): CUDA events, warm-ups, few rounds: re-weighting GB/s against a device
   copy; cross-attention streams against SDPA; ``encode_images`` against the released schedule
   (N = 2, 4, 8, both modes, bf16); the Vicuna-7B config with random bf16 weights and the realistic
   B = 8 batch: one training step against the released schedule (ratio, tokens/s, peak memory) and
   5-beam generation tokens/s (32 new tokens, ``hf`` and ``lavis``), skipped when free memory or
   the remaining budget is short.

An item that would overrun its section's budget is skipped, with the reason in the report.
Results: ``gpu_check-<device>-<date>.json`` and ``.md`` in ``$SAM_FAST_GPU_CHECK_OUT`` (default
``bench/results/``; ``--out`` overrides), with device, versions, commit and date. Exit status 1
when a correctness check failed (or an item raised), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_ENV = "SAM_FAST_GPU_CHECK_OUT"
INJECT_ENV = "SAM_FAST_GPU_CHECK_INJECT_FAILURE"
BUDGETS = {"build": 180.0, "tests": 120.0, "model_checks": 60.0, "benchmarks": 120.0}

# pytest selections that execute kernels on the device (collected only in --dry-run)
CUDA_TESTS = [
    "tests/ops/test_context_reweight.py",
    "tests/ops/test_cross_attention.py",
    "tests/ops/test_linear_cross_entropy.py::test_cuda_backends_within_budget",
    "tests/models/test_encode_images.py::test_fused_attention_through_the_model_with_gradients",
    "tests/models/test_encode_images.py::test_encode_images_has_no_device_sync_on_cuda",
    "tests/ops/test_llama.py",
    "tests/models/test_llama_kernels.py",
]

FLOOR = {"float32": 2e-6, "float16": 2.0**-9, "bfloat16": 2.0**-6}  # relative to max|oracle|


def _prompts(model, batch: dict) -> dict:
    """Generation inputs from a training batch already on the device (as bench/e2e's
    realistic_prompts, which builds them on the CPU): each row's prompt (placeholders and
    instruction, up to its first label) left-padded, the images' cached ViT features."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    starts = (labels != -100).int().argmax(1).tolist()
    width = max(starts)
    pad = model.config.text_config.pad_token_id or 0
    out = torch.full((len(starts), width), pad, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(out)
    for b, n in enumerate(starts):
        out[b, width - n:] = ids[b, :n]
        mask[b, width - n:] = 1
    with torch.no_grad():
        feats = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    return dict(image_features=feats, image_counts=batch["image_counts"], qformer_input_ids=batch["qformer_input_ids"],
                qformer_attention_mask=batch["qformer_attention_mask"], input_ids=out, attention_mask=mask)


# ----------------------------------------------------------------------------- report plumbing
class Section:
    """Items of one section under a wall-clock budget; an item whose estimate exceeds what is
    left is skipped, an exception is recorded as an error."""

    def __init__(self, name: str, budget: float):
        self.name, self.budget, self.t0 = name, budget, time.monotonic()
        self.items: list[dict] = []

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def add(self, name: str, status: str, **info) -> dict:
        item = {"name": name, "status": status, **info}
        self.items.append(item)
        extra = {k: v for k, v in info.items() if k not in ("traceback",)}
        print(f"  [{self.name}] {name}: {status} {json.dumps(extra, default=str)}", flush=True)
        return item

    def skip(self, name: str, why: str) -> dict:
        return self.add(name, "skipped", reason=why)

    def run(self, name: str, fn, estimate: float = 0.0, correctness: bool = True):
        """Run fn() -> dict (may hold "ok": bool for a check); skip if `estimate` s would overrun."""
        left = self.remaining()
        if estimate > left:
            return self.skip(name, f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left of the {self.name} budget")
        t0 = time.monotonic()
        try:
            info = fn() or {}
        except _Skip as s:
            return self.skip(name, str(s))
        except Exception as e:  # recorded, never fatal for the rest of the run
            return self.add(name, "error", seconds=round(time.monotonic() - t0, 2), correctness=correctness,
                            error=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-3000:])
        ok = info.pop("ok", True)
        return self.add(name, "ok" if ok else "failed", seconds=round(time.monotonic() - t0, 2),
                        correctness=correctness, **info)

    def summary(self) -> dict:
        states = {i["status"] for i in self.items}
        if states & {"failed", "error"}:
            status = "failed"
        elif not self.items or states == {"skipped"}:
            status = "skipped"
        else:
            status = "ok"
        return {"status": status, "budget_s": self.budget, "seconds": round(time.monotonic() - self.t0, 2),
                "items": self.items}


class _Skip(Exception):
    """Raised inside an item to skip it with a reason."""


def _env_info(device) -> dict:
    import torch

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception as e:  # not installed
            return f"unavailable ({type(e).__name__})"

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        commit, dirty = None, None
    # a copy of the tree (no .git, or a synthetic one): the caller may say which commit it is
    commit = os.environ.get("SAM_FAST_GIT_COMMIT") or commit
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu-{platform.machine()}"
    return {"device": name, "device_type": device.type, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": version("triton"),
            "transformers": version("transformers"), "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count()}


# ----------------------------------------------------------------------------- 1. build
def section_build(sec: Section, dry: bool, no_build: bool) -> None:
    import torch

    if dry or no_build:
        sec.skip("pip install -e .", "dry run: the installed build is used" if dry else "--no-build")
    else:
        def build():
            env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4), SAM_FAST_BUILD_EXT="1")
            if torch.cuda.is_available() and not env.get("TORCH_CUDA_ARCH_LIST"):
                major, minor = torch.cuda.get_device_capability()
                env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: half the nvcc work
            cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-build-isolation",
                   "--no-deps", "--no-index", "-e", str(ROOT)]
            timeout = max(sec.remaining() - 15, 10)
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"ok": False, "reason": f"build ran past {timeout:.0f} s"}
            tail = (p.stdout + p.stderr)[-1500:]
            print(tail if p.returncode else "\n".join(
                line for line in (p.stdout + p.stderr).splitlines() if line.startswith("sam_fast:")), flush=True)
            return {"ok": p.returncode == 0, "rc": p.returncode, "arch_list": env.get("TORCH_CUDA_ARCH_LIST"),
                    "max_jobs": env["MAX_JOBS"], **({"log_tail": tail} if p.returncode else {})}

        sec.run("pip install -e .", build, estimate=30)
        _activate_editable_install()

    def info():
        # a fresh interpreter: this one may hold an older sam_fast._C
        code = ("import json; from sam_fast import _ext; _ext.load(); i = _ext.info(); "
                "print(json.dumps({k: v for k, v in i.items() if k != 'module'}, default=str))")
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if p.returncode:
            return {"ok": False, "error": p.stderr[-800:]}
        i = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"sam_fast._ext.info(): {i}", flush=True)
        ok = bool(i.get("built")) and bool(i.get("torch_matches")) and not i.get("error")
        if torch.cuda.is_available() and not dry:
            ok = ok and bool(i.get("with_cuda"))  # the CUDA kernels must be in the build on a GPU machine
        return {"ok": ok, "ext": i}

    sec.run("sam_fast._ext.info()", info)


def _activate_editable_install() -> None:
    """Make an editable install done by this very process importable in it: run the site
    directories' .pth files again (they install the finder that maps kernels/ to
    sam_fast._kernels); a process only reads them at start-up."""
    import importlib
    import site
    import sysconfig

    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and os.path.isdir(path):
            site.addsitedir(path)
    importlib.invalidate_caches()


# ----------------------------------------------------------------------------- 2. tests
def section_tests(sec: Section, dry: bool, log_path: Path | None = None) -> None:
    selected = [t for t in CUDA_TESTS if (ROOT / t.split("::")[0]).exists()]
    missing = sorted(set(CUDA_TESTS) - set(selected))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--benchmark-disable"]
    cmd += ["--collect-only", "-q"] if dry else ["-v", "-rfE", "--tb=short"]

    def run():
        timeout = max(sec.remaining() - 5, 5)
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd + selected, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            out, rc, timed_out = p.stdout + p.stderr, p.returncode, False
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, timed_out = None, True
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(out)
        info = {"log": str(log_path) if log_path else None, "selection": selected, "missing_files": missing, "rc": rc, "wall_s": round(time.monotonic() - t0, 1)}
        if dry:
            ids = [line for line in out.splitlines() if "::" in line]
            info.update(collected=len(ids), ok=rc == 0 and len(ids) > 0)
            if rc:
                info["output_tail"] = out[-1500:]
            return info
        counts = {k: len(re.findall(rf" {k}\b", out)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
        info.update(counts=counts, failed=failed[:50], output_tail=out[-3000:] if (rc or timed_out) else "")
        if timed_out:
            info["reason"] = f"pytest ran past {timeout:.0f} s: the tests after the last reported one did not run"
        # rc 1: failures; 2-5: interrupted, usage error, nothing collected. A timeout alone is the
        # budget's doing, not the code's: the tests that ran are judged, the rest reported as not run.
        info["ok"] = not failed and not counts["FAILED"] and not counts["ERROR"] and rc in (0, None)
        return info

    sec.run("pytest (collect only)" if dry else "pytest (CUDA tests)", run, estimate=10)


# ----------------------------------------------------------------------------- 3. model checks
def _err(a, b) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def within_budget(fast, plain, oracle, dtype_name: str) -> dict:
    """Error-budget rule: |fast - oracle| <= 2 |plain - oracle| + floor * max|oracle|."""
    oracle = oracle.detach().double().cpu()
    err, plain_err = _err(fast, oracle), _err(plain, oracle)
    budget = 2 * plain_err + FLOOR[dtype_name] * max(oracle.abs().max().item(), 1e-30)
    return {"ok": err <= budget, "err": f"{err:.3g}", "budget": f"{budget:.3g}"}


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


@contextlib.contextmanager
def _backend(name: str | None):
    old = os.environ.get("SAM_FAST_BACKEND")
    if name is None:
        os.environ.pop("SAM_FAST_BACKEND", None)
    else:
        os.environ["SAM_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAM_FAST_BACKEND", None)
        else:
            os.environ["SAM_FAST_BACKEND"] = old


def _tiny_model(mode: str, seed: int = 0, **kw):
    import torch

    from sam_fast import SAM, SAMConfig

    torch.manual_seed(seed)
    model = SAM(SAMConfig.tiny(context_mode=mode, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.5, generator=g)
        for mod in (model.adaptive_adjustment, model.guidance_in, model.guidance_out):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
    return model


def _lowp(model, device, dtype):
    """model on device in dtype; the Adaptive Adjustment (Linear(D, 1)) stays fp32 in low precision,
    as the reference and released-schedule code compute the merge weights in fp32."""
    import torch

    model = model.to(device, dtype)
    if dtype in (torch.bfloat16, torch.float16):
        model.adaptive_adjustment.float()
    return model


def _shapes(config, batch_size: int = 8, seed: int = 0):
    """`realistic_shapes`, Q-former instruction lengths capped to what the config's Q-former embeds."""
    import dataclasses

    from sam_fast.bench_plan import realistic_shapes

    cap = max(int(config.qformer_config.max_position_embeddings) // 2, 1)
    return [dataclasses.replace(s, qformer_tokens=min(s.qformer_length(), cap))
            for s in realistic_shapes(seed, batch_size=batch_size)]


def _ragged(model, counts, seed=0, text_len=7):
    import torch

    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    P = (vc.image_size // vc.patch_size) ** 2 + 1
    feats = torch.randn(sum(counts), P, vc.hidden_size, generator=g)
    ids = torch.randint(5, model.config.qformer_config.vocab_size, (len(counts), text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, text_len - 2:] = 0
    return feats, ids, mask


def section_model_checks(sec: Section, device, dry: bool, inject: bool) -> None:
    import copy

    import torch

    from sam_fast.ops import context_reweight
    from sam_fast.ops.dispatch import dispatcher
    from sam_fast.reference import reference_encode_images

    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    counts = [2, 3, 1]

    # the re-weighting op on each device backend, forward + backward (values and scores)
    def reweight(backend, dtype):
        def run():
            g = torch.Generator().manual_seed(1)
            T, P, D = sum(counts), 37, 64
            V64 = torch.randn(T, P, D, generator=g, dtype=torch.float64)
            s64 = torch.randn(T, P, generator=g, dtype=torch.float64) * 3
            cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
            up = torch.randn(T, P, D, generator=g, dtype=torch.float64)
            why = dict(dispatcher("context_reweight").reasons(V64.to(device, dtype), s64.float().to(device),
                                                            cu.to(device), "leave_one_out"))
            if why.get(backend) is not None:
                raise _Skip(f"backend {backend} cannot run here: {why[backend]}")

            def fwd_bwd(V, s, name):
                V, s = (t.detach().requires_grad_() for t in (V, s))
                with _backend(name):
                    out = context_reweight(V, s, cu.to(V.device), "leave_one_out")
                grads = torch.autograd.grad(out, (V, s), up.to(out.device, out.dtype))
                return [out.detach(), *grads]

            oracle = fwd_bwd(V64, s64, "reference")
            args = [V64.to(device, dtype), s64.float().to(device)]  # the model's scores are fp32
            plain = fwd_bwd(*args, "reference")
            fast = fwd_bwd(*args, backend)
            if inject:
                fast[0] = fast[0] + 1.0
            res = {n: within_budget(f, p, o, _dtype_name(dtype)) for n, f, p, o in zip(("out", "dV", "ds"), fast, plain, oracle)}
            return {"ok": all(r["ok"] for r in res.values()), **res}
        return run

    backends = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    for backend in backends:
        for dtype in dtypes:
            sec.run(f"context_reweight {backend} {_dtype_name(dtype)} fwd+bwd", reweight(backend, dtype), estimate=1)

    # encode_images against the one-image-at-a-time reference, both modes
    def encode(mode, dtype):
        def run():
            model = _tiny_model(mode, interaction_layers=(1, 4))
            feats, ids, mask = _ragged(model, counts)
            with torch.no_grad():
                om = copy.deepcopy(model).double()
                om.adaptive_adjustment.float()  # the reference merges in fp32
                oracle = reference_encode_images(om, feats.double(), counts, ids, mask)
                m = _lowp(model, device, dtype)
                f, i, k = feats.to(device, dtype), ids.to(device), mask.to(device)
                fast = m.encode_images(image_features=f, image_counts=counts, qformer_input_ids=i,
                                       qformer_attention_mask=k)
                plain = reference_encode_images(m, f, counts, i, k)
            if inject:
                fast = fast + 1.0
            return within_budget(fast, plain, oracle, _dtype_name(dtype))
        return run

    for mode in ("leave_one_out", "shared"):
        for dtype in dtypes:
            sec.run(f"encode_images {mode} {_dtype_name(dtype)} vs reference", encode(mode, dtype), estimate=2)

    # packed training step (default) against the padded HF call: loss and trainable gradients
    def packed_step(mode):
        def run():
            from sam_fast.bench_plan import realistic_batch

            model = _tiny_model(mode)
            model.train()
            for mod in model.modules():  # deterministic: dropout off, training code paths on
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
            batch = realistic_batch(model.config, _shapes(model.config, 3), seed=0)

            def loss_and_grads(m, dev, dtype, packing):
                m = m.to(dev, dtype)
                b = {k: (v.to(dev, dtype) if torch.is_floating_point(v) else v.to(dev)) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
                params = [p for p in m.parameters() if p.requires_grad]
                loss = m(**b, packing=packing).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                return [loss.detach().reshape(1), torch.cat([g.reshape(-1) for g in grads])]

            oracle = loss_and_grads(copy.deepcopy(model), "cpu", torch.float64, False)
            plain = loss_and_grads(copy.deepcopy(model), device, torch.float32, False)
            fast = loss_and_grads(model, device, torch.float32, None)
            if inject:
                fast[0] = fast[0] + 1.0
            res = {n: within_budget(f, p, o, "float32") for n, f, p, o in zip(("loss", "grads"), fast, plain, oracle)}
            return {"ok": all(r["ok"] for r in res.values()), "loss": float(fast[0]), **res}
        return run

    for mode in ("leave_one_out", "shared"):
        sec.run(f"packed training step vs packing=False ({mode})", packed_step(mode), estimate=3)

    def compiled():
        if dry or device.type != "cuda":
            raise _Skip("dry run / no CUDA: torch.compile is exercised on the GPU only")
        torch._dynamo.reset()
        model = _tiny_model("leave_one_out", interaction_layers=(1, 4)).to(device)
        feats, ids, mask = (t.to(device) for t in _ragged(model, counts))
        fn = torch.compile(model.encode_images)
        with torch.no_grad():
            eager = model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids,
                                        qformer_attention_mask=mask)
            out = fn(image_features=feats, image_counts=counts, qformer_input_ids=ids, qformer_attention_mask=mask)
        err = _err(out, eager)
        return {"ok": err <= 1e-4 * max(eager.abs().max().item(), 1.0), "max_abs_diff_vs_eager": f"{err:.3g}"}

    sec.run("torch.compile(encode_images) smoke", compiled, estimate=20)


# ----------------------------------------------------------------------------- 4. benchmarks
class Timer:
    """Median milliseconds of fn() after warm-ups: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int = 2, rounds: int = 5) -> float:
        import torch

        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _free_bytes(device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    return free


def section_benchmarks(sec: Section, device, dry: bool) -> None:
    import torch

    from sam_fast.ops import context_reweight, cross_attention_streams, cross_attention_streams_ref, mix_kv

    timer = Timer(device)
    warm, rounds = (1, 1) if dry else (3, 10)
    bf16 = torch.bfloat16

    def reweight():
        B, N, P, D = (2, 3, 5, 16) if dry else (4, 8, 257, 1408)
        res = {"shape": [B, N, P, D]}
        for dtype in (torch.float32, bf16):
            F = torch.randn(B * N, P, D, device=device, dtype=dtype)
            s = torch.randn(B * N, P, device=device)
            cu = torch.arange(0, B * N + 1, N, dtype=torch.int32, device=device)
            offs = cu.tolist()
            dst = torch.empty_like(F)
            nbytes = 2 * F.numel() * F.element_size()
            with torch.no_grad():
                t = timer(lambda: context_reweight(F, s, cu, "leave_one_out", offsets=offs), warm, rounds)
                tc = timer(lambda: dst.copy_(F), warm, rounds)
            name = _dtype_name(dtype)
            res[name] = {"ms": round(t, 4), "gbps": round(nbytes / t / 1e6, 1), "copy_gbps": round(nbytes / tc / 1e6, 1),
                         "time_vs_copy": round(t / tc, 2)}
        return res

    def streams():
        T, Q, H, d, P, N = (4, 8, 2, 16, 5, 2) if dry else (8, 32, 12, 64, 257, 4)
        res = {"shape": {"images": T, "Q": Q, "H": H, "d": d, "P": P}}
        for dtype in (bf16,) if dry else (bf16, torch.float32):
            q = torch.randn(2 * T, H, Q, d, device=device, dtype=dtype)
            buf = torch.randn(T, P, 2 * H * d, device=device, dtype=dtype)
            k = buf[..., : H * d].unflatten(-1, (H, d)).transpose(1, 2)
            v = buf[..., H * d:].unflatten(-1, (H, d)).transpose(1, 2)
            k2, v2 = k.contiguous(), v.contiguous()
            index = torch.tensor([[m for m in range(b * N, (b + 1) * N) if m != i] for b in range(T // N)
                                  for i in range(b * N, (b + 1) * N)], device=device)
            wts = torch.softmax(torch.randn(T, N - 1, P, device=device), 1)
            with torch.no_grad():
                tf = timer(lambda: cross_attention_streams(q, k, v, k2, v2), warm, rounds)
                ts = timer(lambda: cross_attention_streams_ref(q, k, v, k2, v2), warm, rounds)
                tm = timer(lambda: cross_attention_streams(q, k, v, k, v, mix=(index, wts)), warm, rounds)
                tms = timer(lambda: cross_attention_streams_ref(q, k, v, *mix_kv(k, v, (index, wts))), warm, rounds)
            res[_dtype_name(dtype)] = {"streams_ms": round(tf, 4), "sdpa_ms": round(ts, 4),
                                       "speedup_vs_sdpa": round(ts / tf, 2), "mix_ms": round(tm, 4),
                                       "mix_kv_sdpa_ms": round(tms, 4), "mix_speedup": round(tms / tm, 2)}
        return res

    def encode():
        from sam_fast.reference import released_schedule_encode_images

        res = {}
        for mode in ("leave_one_out", "shared"):
            if dry:
                model = _lowp(_tiny_model(mode), device, bf16)
            else:
                model = _encode_model(mode, device, bf16)
            vc = model.config.vision_config
            P = (vc.image_size // vc.patch_size) ** 2 + 1
            for n in (2, 4, 8):
                if sec.remaining() < (1 if dry else 8):
                    res[f"{mode}_N{n}"] = "skipped: budget"
                    continue
                counts = [n, n]
                feats = torch.randn(sum(counts), P, vc.hidden_size, device=device, dtype=bf16)
                ids = torch.randint(5, model.config.qformer_config.vocab_size, (2, 32), device=device)
                mask = torch.ones_like(ids)
                with torch.no_grad():
                    tf = timer(lambda: model.encode_images(image_features=feats, image_counts=counts,
                                                           qformer_input_ids=ids, qformer_attention_mask=mask),
                               warm, min(rounds, 5))
                    tr = timer(lambda: released_schedule_encode_images(model, feats, counts, ids, mask),
                               warm, min(rounds, 5))
                res[f"{mode}_N{n}"] = {"sam_fast_ms": round(tf, 3), "released_ms": round(tr, 3),
                                       "speedup_vs_released": round(tr / tf, 2)}
            del model
        return res

    sec.run("context_reweight GB/s vs device copy", reweight, estimate=3, correctness=False)
    sec.run("cross_attention_streams vs SDPA", streams, estimate=5, correctness=False)
    sec.run("encode_images vs released schedule (bf16, B=2)", encode, estimate=15, correctness=False)
    sec.run("vicuna-7b train step + 5-beam generation" if not dry else "tiny-config train step + generation",
            lambda: _bench_7b(sec, device, dry, timer), estimate=5 if dry else 60, correctness=False)


def _encode_model(mode, device, dtype):
    """Full-size Q-former and guidance (Vicuna-7B config) with a 1-layer ViT and an empty LLM:
    what encode_images runs on cached features."""
    import torch
    from transformers import InstructBlipVisionConfig, LlamaConfig

    from sam_fast import SAM, SAMConfig

    vision = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=16, image_size=224, patch_size=14)
    text = LlamaConfig(vocab_size=64, hidden_size=4096, intermediate_size=64, num_hidden_layers=0,
                       num_attention_heads=32, num_key_value_heads=1, head_dim=8)
    cfg = SAMConfig.instructblip_vicuna7b(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                          image_token_index=3, context_mode=mode)
    torch.manual_seed(0)
    with torch.device(device):
        m = _lowp(SAM(cfg), device, dtype).eval()
    with torch.no_grad():
        m.query_tokens.normal_(0, 0.5)
        for mod in (m.adaptive_adjustment, m.guidance_in, m.guidance_out):
            mod.weight.normal_(0, 0.02)
    return m


def _bench_7b(sec: Section, device, dry: bool, timer: Timer) -> dict:
    """One training step sam_fast vs the released schedule and 5-beam generation, B=8 realistic."""
    import torch

    sys.path.insert(0, str(ROOT / "bench" / "e2e"))
    import _setup  # bench/e2e/_setup.py: step functions, realistic prompts

    from sam_fast import SAM, SAMConfig
    from sam_fast.bench_plan import realistic_batch

    dtype = torch.bfloat16
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the earlier sections' cached blocks count as used in mem_get_info
    if dry:
        cfg = SAMConfig.tiny()
    else:
        need = 60 * 2**30  # weights ~15 GB, the step's activations and the released side's on top
        free = _free_bytes(device)
        if free is not None and free < need:
            raise _Skip(f"{free / 2**30:.0f} GiB free on the device, the 7B section needs ~{need / 2**30:.0f}")
        if sec.remaining() < 60:
            raise _Skip(f"{sec.remaining():.0f} s left of the benchmarks budget, the 7B section needs ~60")
        cfg = SAMConfig.instructblip_vicuna7b()
    old_dtype = torch.get_default_dtype()
    t0 = time.monotonic()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = SAM(cfg)
    finally:
        torch.set_default_dtype(old_dtype)
    model.adaptive_adjustment.float()
    with torch.no_grad():
        for m in (model.adaptive_adjustment, model.guidance_in, model.guidance_out):
            m.weight.normal_(0, 0.02)
    model.train()
    res = {"config": "tiny" if dry else "instructblip_vicuna7b", "init_s": round(time.monotonic() - t0, 1)}
    shapes = _shapes(model.config, 8)
    batch = realistic_batch(model.config, shapes, seed=0)
    batch = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    res.update(batch_size=len(shapes), llm_tokens=tokens, images=sum(batch["image_counts"]))
    cuda = device.type == "cuda"
    cached = _setup.features(model, batch["pixel_values"])  # sam_fast from cached ViT features
    steps = (("sam_fast", _setup.step_sam_fast), ("cached", lambda m, o, b: _setup.step_cached(m, o, b, cached)),
             ("released", _setup.step_released))
    for name, step in steps:
        if not dry and sec.remaining() < 20:
            res[name] = "skipped: budget"
            continue
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timer(lambda: step(model, opt, batch), warmup=1, rounds=1 if dry else 3)
        res[name] = {"step_ms": round(ms, 1), "tokens_per_s": round(tokens / ms * 1e3, 1)}
        if cuda:
            res[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if isinstance(res.get("sam_fast"), dict) and isinstance(res.get("released"), dict):
        res["speedup_vs_released"] = round(res["released"]["step_ms"] / res["sam_fast"]["step_ms"], 2)
    if isinstance(res.get("cached"), dict) and isinstance(res.get("released"), dict):
        res["cached_speedup_vs_released"] = round(res["released"]["step_ms"] / res["cached"]["step_ms"], 2)
    del cached
    opt.zero_grad(set_to_none=True)
    del opt
    model.eval()
    prompts = _prompts(model, batch)
    new = 4 if dry else 32
    # hf_static: HF's fixed-shape KV cache, whose decoding step HF's generate compiles on a GPU
    # (the warm-up call pays the compilation); its ids must equal the dynamic cache's
    hf_ids = None
    for mode, need in (("hf", 15), ("lavis", 15), ("hf_static", 90)):
        if not dry and sec.remaining() < need:
            res[f"generate_{mode}"] = "skipped: budget"
            continue
        kw = dict(num_beams=5, max_new_tokens=new, generation_mode=mode.split("_")[0])
        if mode.startswith("hf"):
            kw["min_new_tokens"] = new  # a random model's early EOS would shorten the timing
        else:
            kw["min_length"] = new + 1
        if mode == "hf_static":
            kw["cache_implementation"] = "static"
        out = []
        ms = timer(lambda: out.append(model.generate(**prompts, **kw)), warmup=1, rounds=1 if dry else 2)
        made = int(out[-1].shape[0] * out[-1].shape[1])
        res[f"generate_{mode}"] = {"ms": round(ms, 1), "new_tokens": made, "tokens_per_s": round(made / ms * 1e3, 1)}
        if mode == "hf":
            hf_ids = out[-1]
        elif mode == "hf_static" and hf_ids is not None:
            res[f"generate_{mode}"]["same_ids_as_hf"] = bool(torch.equal(out[-1], hf_ids))
    del model, prompts, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- report
def _markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# sam_fast GPU check ({'dry run, ' if report['dry_run'] else ''}{env['device']})", "",
             f"- date: {env['date']}, commit: {env['commit']}{' (dirty)' if env['dirty'] else ''}",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
             f"transformers {env['transformers']}, Python {env['python']}",
             f"- result: **{'PASS' if report['passed'] else 'FAIL'}** in {report['seconds']:.0f} s", "",
             "| section | status | seconds / budget |", "|---|---|---|"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} / {s['budget_s']:.0f} |")
    for name, s in report["sections"].items():
        lines += ["", f"## {name}", "", "| item | status | details |", "|---|---|---|"]
        for it in s["items"]:
            details = {k: v for k, v in it.items() if k not in ("name", "status", "traceback", "output_tail",
                                                              "log_tail", "correctness", "selection")}
            text = json.dumps(details, default=str).replace("|", "\\|")
            lines.append(f"| {it['name']} | {it['status']} | `{text[:600]}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the sections, write the JSON and markdown report, return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no build, pytest collects only")
    ap.add_argument("--no-build", action="store_true", help="skip the pip build (use what is installed)")
    ap.add_argument("--out", default=None, help=f"report folder (default ${OUT_ENV} or bench/results)")
    ap.add_argument("--inject-failure", action="store_true",
                    help=f"perturb the fast results of the correctness checks (tests the exit status; also {INJECT_ENV}=1)")
    ap.add_argument("--sections", default=",".join(BUDGETS), help="comma-separated subset of " + ",".join(BUDGETS))
    args = ap.parse_args(argv)
    out_dir = Path(args.out or os.environ.get(OUT_ENV) or ROOT / "bench" / "results")
    inject = args.inject_failure or os.environ.get(INJECT_ENV, "") not in ("", "0")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(BUDGETS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(BUDGETS)}")

    t_start = time.monotonic()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run for the CPU mode", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    env = _env_info(device)
    print(f"gpu_check: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | commit {env['commit']} | {'dry run' if dry else 'GPU run'}", flush=True)

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", env["device"]) + ("-dry" if dry else "")
    stem = out_dir / f"gpu_check-{slug}-{env['date'][:10]}"
    sections = {}
    for name in BUDGETS:
        sec = Section(name, BUDGETS[name])
        print(f"== {name} (budget {sec.budget:.0f} s)", flush=True)
        if name not in wanted:
            sec.skip(name, "not selected (--sections)")
        elif name == "build":
            section_build(sec, dry, args.no_build)
        elif name == "tests":
            section_tests(sec, dry, Path(f"{stem}-pytest.log"))
        elif name == "model_checks":
            section_model_checks(sec, device, dry, inject)
        else:
            section_benchmarks(sec, device, dry)
        sections[name] = sec.summary()

    bad = [f"{n}: {i['name']} ({i['status']})" for n, s in sections.items() for i in s["items"]
           if i["status"] in ("failed", "error") and (i.get("correctness", True) or i["status"] == "error")]
    report = {"dry_run": dry, "inject_failure": inject, "env": env, "sections": sections, "passed": not bad,
              "failures": bad, "seconds": round(time.monotonic() - t_start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(f"{stem}.md").write_text(_markdown(report))
    print(f"gpu_check: {'PASS' if not bad else 'FAIL'} in {report['seconds']:.0f} s; "
          f"report {stem}.json and .md", flush=True)
    for b in bad:
        print(f"  failed: {b}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
