"""One prepared, offline check of everything in sam_fast that needs a GPU (``make gpu-check``).

    python bench/gpu_check.py                # on a CUDA machine: build, benchmarks, model checks, tests
    python bench/gpu_check.py --dry-run      # on a CPU: the same items at toy sizes (part of the tests)

It is made for a borrowed machine that is taken back after a few minutes and returns one folder:
whatever happens, that folder holds a report of what ran.

- The report (``gpu_check-<device>-<date>.json`` and ``.md``, plus the build, worker and pytest
  logs) is rewritten atomically after every item, in ``--out``, else ``$SAM_FAST_GPU_CHECK_OUT``,
  else ``$OUT`` (the device machine's return folder), else ``bench/results/``. Each item records
  its status (pending, running, ok, failed, timeout, skipped), seconds, and its result or a
  one-line error; a killed run leaves the items it finished, the one running marked ``running``.
- ``--deadline`` (seconds from start, default 420): a watchdog thread then kills what runs, marks
  that item ``timeout`` (``cut_by: deadline``), the rest ``skipped``, writes the report and exits 3.
- Items that can hang or compile for long run in worker processes (``--worker``, a new session
  each) under a per-item timeout: a hung item's worker is killed with its process group, the item
  is marked ``timeout`` and a fresh worker runs the items after it; a worker that dies (a
  segfault) or raises costs only its item. Workers die with the main process.

Items, most valuable first (per-item timeout in seconds; ``--timeouts ID=S`` overrides):

1. ``build.pip`` (180): ``pip install --no-build-isolation --no-deps --no-index -e .`` against the
   machine's own torch, CUDA extension included (MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST = this
   GPU's arch unless set); ``build.ext_info`` (90): ``sam_fast._ext.info()`` in a fresh interpreter.
   ``--dry-run`` / ``--no-build`` skip the compile.
2. ``bench.train_step`` (150): the Vicuna-7B config, random bf16 weights, the realistic B = 8
   batch: one training step from pixels, from cached ViT features and with the released schedule
   (ms, tokens/s, peak memory, model FLOP rate and MFU against the GPU's dense bf16 peak;
   ``SAM_FAST_PEAK_TFLOPS`` overrides the peak), which ``recompute_qformer="auto"`` chose and why,
   then a torch.profiler run of 3 sam_fast steps: the top 15 kernels by total device time
   (calls, ms, % of kernel time), kernel vs wall time per step (the host gap) and kernel launches
   per step (a table in the markdown report). ``bench.generate`` (180): 5-beam generation of
   32 tokens, ``hf``, ``lavis`` and ``hf`` with the static cache (compiled by HF; its ids must
   equal the dynamic cache's).
3. Op benchmarks. ``bench.cross_attention_decision`` (90): forward + backward of every Q-former
   cross layer for the B = 8 batch's 30 images (12 heads of 64, the 32 query rows, 257 patches),
   the W rows' K/V mixed inside the fused streams kernel against materialised once by
   ``context_reweight`` + one SDPA call per layer over both streams, per context mode in bf16
   and fp32, eagerly and replayed from a CUDA graph: which is faster, by how much, and whether
   one algorithm wins everywhere (``verdict``). ``bench.liger`` (90): Liger-Kernel's RMSNorm,
   SwiGLU, RoPE and fused linear cross-entropy beside ours at the LLaMA-7B shapes (bf16, forward
   + backward, outputs compared), skipped where ``liger_kernel`` cannot be imported. Then
   ``bench.reweight`` / ``bench.streams`` / ``bench.encode`` (60, 60, 90): re-weighting bandwidth
   against a device copy, cross-attention streams against SDPA, ``encode_images`` against the
   released schedule (N = 2, 4, 8, both modes, bf16); CUDA events, warm-ups, few rounds.
4. ``check.*`` (60 each, ``check.compile`` 120): the re-weighting op on every device backend against a float64 oracle (fwd + bwd), a
   tiny SAM's ``encode_images`` against `sam_fast.reference.reference_encode_images` in both
   context modes (fp32, bf16, fp16), the packed training step against ``packing=False``,
   ``torch.compile(encode_images)`` (GPU only). Error-budget rule: the error against a float64
   oracle is at most twice the plain PyTorch computation's error in the same dtype, plus a floor.
5. ``tests.pytest`` (240, and at most until 10 s before the deadline): the CUDA test ids,
   compiled kernels (TRITON_INTERPRET unset), each test under pytest-timeout's ``--timeout`` when
   that plugin is installed. A run cut by its timeout is a failure (``timeout``). The full log
   goes to ``...-pytest.log``; ``--dry-run`` only collects the ids.

An item that cannot finish before the deadline (its estimate exceeds the time left) is skipped,
saying so. ``--sections`` / ``--items 'bench.*,check.encode.*'`` select items (the rest is reported
as not selected). Stdout holds one line per item. Exit status: 0 all ran ok (or were skipped), 1 an item
failed or timed out, 2 usage error or no CUDA device, 3 ``--deadline`` reached, 128 + N on signal N
(SIGTERM, SIGINT: the report is written first).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

T0 = time.monotonic()  # the deadline counts from here: imports and start-up included
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
OUT_ENV = "SAM_FAST_GPU_CHECK_OUT"
RETURN_ENV = "OUT"  # the folder a borrowed device machine sends back
INJECT_FAILURE_ENV = "SAM_FAST_GPU_CHECK_INJECT_FAILURE"
INJECT_ENV = "SAM_FAST_GPU_CHECK_INJECT"  # test-only: hang:ID / crash:ID, comma-separated
PEAK_ENV = "SAM_FAST_PEAK_TFLOPS"
SECTIONS = ("build", "benchmarks", "model_checks", "tests")
DEFAULT_DEADLINE = 420.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEADLINE = 0, 1, 2, 3
PYTEST_PER_TEST_TIMEOUT = 90  # pytest-timeout's --timeout: one hung test fails alone
PYTEST_DEADLINE_MARGIN = 10.0  # pytest stops this long before the deadline, so its counts are kept

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

# dense bf16 tensor-core peak (TFLOP/s) by device-name fragment, first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("H800", 989.0), ("A100", 312.0))


class _Skip(Exception):
    """Raised inside an item to skip it with a reason."""


class _Timeout(Exception):
    """Raised by an in-process item whose subprocess ran past its timeout (a failure), with what
    it measured before the cut."""

    def __init__(self, message: str, result: dict, cut_by: str = "item timeout"):
        super().__init__(message)
        self.result, self.cut_by = result, cut_by


def _say(text: str, file=None) -> None:
    """Print and flush; a closed stdout (``| head``) must not stop the run or its report."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=file or sys.stdout, flush=True)


def _one_line(text, limit: int = 300) -> str:
    """A message fit for one report field and one stdout line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- items
@dataclass
class Item:
    """One unit of the check. `worker`: the worker group it runs in (None: in this process, for
    items that only wait on a subprocess); `skip`: a reason known before it starts."""

    id: str
    name: str
    section: str
    fn: Callable
    timeout: float
    estimate: float = 0.0
    worker: str | None = None
    params: dict = field(default_factory=dict)
    skip: str | None = None
    brief: tuple = ()  # dotted result keys for the stdout line (default: the scalar ones)


def plan(dry: bool, no_build: bool = False) -> list[Item]:
    """Every item, in the order they run: most valuable first."""
    label = "tiny-config" if dry else "vicuna-7b"
    dtypes = ("float32", "bfloat16", "float16")
    items = [
        # timeouts: a few times what an H200 took, so a hang costs little of the deadline
        Item("build.pip", "pip install -e .", "build", _item_pip, 180, 30,
             skip="dry run: the installed build is used" if dry else "--no-build" if no_build else None),
        Item("build.ext_info", "sam_fast._ext.info()", "build", _item_ext_info, 90, 2,
             brief=("ext.built", "ext.torch_matches", "ext.with_cuda")),
        Item("bench.train_step", f"{label} train step (pixels, cached, released)", "benchmarks",
             _item_train_step, 150, 30, worker="7b",
             brief=("sam_fast.step_ms", "sam_fast.mfu", "cached.step_ms", "cached.mfu", "released.step_ms",
                    "speedup_vs_released", "recompute_qformer.recompute", "profile.host_gap_ms_per_step",
                    "profile.launches_per_step")),
        Item("bench.generate", f"{label} 5-beam generation (hf, lavis, hf_static)", "benchmarks", _item_generate,
             180, 20, worker="7b", brief=("generate_hf.tokens_per_s", "generate_lavis.tokens_per_s",
                                          "generate_hf_static.tokens_per_s", "generate_hf_static.same_ids_as_hf")),
        Item("bench.train_step_compiled", f"{label} train step as one compiled graph (default, CUDA graphs)",
             "benchmarks", _item_train_step_compiled, 300, 150, worker="7b",
             brief=("default.step_ms", "default.compile_s", "reduce-overhead.step_ms", "reduce-overhead.mfu")),
        Item("bench.cross_attention_decision", "cross-attention: in-kernel K/V mix vs materialised + SDPA",
             "benchmarks", _bench_xattn_decision, 90, 20, worker="ops",
             brief=("verdict.one_algorithm", "verdict.summary")),
        Item("bench.liger", "Liger-Kernel beside ours (RMSNorm, SwiGLU, RoPE, linear CE)", "benchmarks",
             _bench_liger, 90, 15, worker="ops", brief=("all_agree", "rows.rms_norm.liger_vs_ours", "rows.swiglu.liger_vs_ours",
                                                        "rows.rope.liger_vs_ours", "rows.fused_linear_cross_entropy.liger_vs_ours")),
        Item("bench.reweight", "context_reweight GB/s vs device copy", "benchmarks", _bench_reweight, 60, 3,
             worker="ops", brief=("float32.gbps", "bfloat16.gbps", "bfloat16.time_vs_copy")),
        Item("bench.streams", "cross_attention_streams vs SDPA", "benchmarks", _bench_streams, 60, 5, worker="ops",
             brief=("bfloat16.speedup_vs_sdpa", "bfloat16.mix_speedup")),
        Item("bench.encode", "encode_images vs released schedule (bf16, B=2)", "benchmarks", _bench_encode, 90, 15,
             worker="ops", brief=("leave_one_out_N8.speedup_vs_released", "shared_N8.speedup_vs_released")),
    ]
    for backend in ("cpu",) if dry else ("triton", "cuda"):
        items += [Item(f"check.reweight.{backend}.{dt}", f"context_reweight {backend} {dt} fwd+bwd", "model_checks",
                       _check_reweight, 60, 1, worker="ops", params=dict(backend=backend, dtype=dt),
                       brief=("out.err", "dV.err", "ds.err")) for dt in dtypes]
    for mode in ("leave_one_out", "shared"):
        items += [Item(f"check.encode.{mode}.{dt}", f"encode_images {mode} {dt} vs reference", "model_checks",
                       _check_encode, 60, 2, worker="ops", params=dict(mode=mode, dtype=dt)) for dt in dtypes]
    items += [Item(f"check.packed.{mode}", f"packed training step vs packing=False ({mode})", "model_checks",
                   _check_packed, 60, 3, worker="ops", params=dict(mode=mode), brief=("loss.err", "grads.err"))
              for mode in ("leave_one_out", "shared")]
    items += [
        Item("check.compile", "torch.compile(encode_images) smoke", "model_checks", _check_compile, 120, 20,
             worker="compile", skip="dry run / no CUDA: torch.compile is exercised on the GPU only" if dry else None),
        Item("tests.pytest", "pytest (collect only)" if dry else "pytest (CUDA tests)", "tests", _item_pytest, 240, 15,
             brief=("summary", "collected")),
    ]
    return items


# ----------------------------------------------------------------------------- where the report goes
def out_dir(cli_out: str | None, environ) -> Path:
    """--out, else $SAM_FAST_GPU_CHECK_OUT, else $OUT (the folder a device machine returns), else
    bench/results."""
    for value in (cli_out, environ.get(OUT_ENV), environ.get(RETURN_ENV)):
        if value:
            return Path(value)
    return ROOT / "bench" / "results"


def _free_stem(folder: Path, base: str) -> Path:
    """`folder/base`, or `base-2`, `-3`, ... when a report of that name exists: an earlier run's
    report is never overwritten."""
    stem, n = folder / base, 1
    while any(Path(f"{stem}{suffix}").exists() for suffix in (".json", ".md")):
        n += 1
        stem = folder / f"{base}-{n}"
    return stem


def injections(environ) -> dict[str, str]:
    """Test-only faults from $SAM_FAST_GPU_CHECK_INJECT (``hang:ID,crash:ID``): item id -> kind."""
    out = {}
    for part in filter(None, (p.strip() for p in environ.get(INJECT_ENV, "").split(","))):
        kind, _, item = part.partition(":")
        if kind not in ("hang", "crash") or not item:
            raise ValueError(f"{INJECT_ENV}: {part[:80]!r} is not hang:ITEM or crash:ITEM")
        out[item] = kind
    return out


def inject_failure(flag: bool, environ) -> bool:
    return flag or environ.get(INJECT_FAILURE_ENV, "") not in ("", "0")


def _hang(where: str) -> None:
    print(f"gpu_check: injected hang in {where}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


# ----------------------------------------------------------------------------- environment
_PROBE = ("import json, torch; ok = torch.cuda.is_available(); "
          "d = dict(available=ok, torch=torch.__version__, torch_cuda=torch.version.cuda); "
          "ok and d.update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability())); "
          "print('CUDA_PROBE ' + json.dumps(d))")
PROBE_TIMEOUT = 90.0


def _cuda_probe() -> dict:
    """The device as a fresh interpreter sees it, under a timeout: this process never initialises
    CUDA (a driver that hangs there would leave no report; a context here would hold GPU memory
    the 7B items need). ``{"available": bool, ...}``, with ``error`` when the probe itself failed."""
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"available": False, "error": f"initialising CUDA ran past {PROBE_TIMEOUT:g} s"}
    found = [ln[len("CUDA_PROBE "):] for ln in p.stdout.splitlines() if ln.startswith("CUDA_PROBE ")]
    if not found:
        last = ((p.stderr or p.stdout).strip().splitlines() or [""])[-1]
        return {"available": False, "error": _one_line(f"the probe exited {p.returncode}: {last}")}
    return json.loads(found[-1])


def _env_info(probe: dict | None) -> dict:
    """Versions without importing torch here (the workers do); the device from `_cuda_probe`."""
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
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
    info = {"device": f"cpu-{platform.machine()}", "device_type": "cpu", "python": platform.python_version(),
            "torch": version("torch"), "torch_cuda": None, "triton": version("triton"),
            "transformers": version("transformers"), "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count()}
    if probe is not None:
        info.update(device=probe.get("name") or "no-cuda-device", device_type="cuda", torch_cuda=probe.get("torch_cuda"),
                    capability=probe.get("capability"), **({"torch": probe["torch"]} if "torch" in probe else {}))
    return info


def peak_tflops(device_name: str, environ=os.environ) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from): $SAM_FAST_PEAK_TFLOPS, else the table."""
    if environ.get(PEAK_ENV):
        return float(environ[PEAK_ENV]), PEAK_ENV
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return peak, f"dense bf16 peak of {fragment}"
    return None, f"unknown for {device_name!r}: set {PEAK_ENV}"


# ----------------------------------------------------------------------------- the run (main process)
class Run:
    """The report and what is in flight. The main thread runs the items; the watchdog thread and
    the signal handlers end the run through `end`, under the same lock, exactly once."""

    def __init__(self, items, *, env, dry, faults, inject_failure, deadline, stem, timeouts):
        self.items = items
        self.by_id = {it.id: it for it in items}
        self.timeouts = timeouts
        self.entries = {it.id: {"id": it.id, "name": it.name, "section": it.section, "status": "pending",
                                "timeout_s": self.timeouts[it.id]} for it in items}
        self.env, self.dry, self.deadline, self.stem = env, dry, deadline, stem
        self.faults, self.inject_failure = faults, inject_failure
        self.deadline_at = T0 + deadline
        self.lock = threading.RLock()
        self.finished = False
        self.child: subprocess.Popen | None = None
        self.status, self.exit_code, self.error = "running", None, None
        self.current: str | None = None  # the in-process item running
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.logs = {k: f"{stem}-{k}.log" for k in ("build", "workers", "pytest")}  # beside the report

    # -- time
    def left(self) -> float:
        return self.deadline_at - time.monotonic()

    def timeout_of(self, item_id: str) -> float:
        return self.timeouts[item_id]

    # -- entries
    def start(self, item_id: str, **extra) -> None:
        with self.lock:
            e = self.entries[item_id]
            e.update(status="running", started_s=round(time.monotonic() - T0, 1), **extra)
            self.write()

    def progress(self, item_id: str, result: dict) -> None:
        with self.lock:
            self.entries[item_id]["result"] = result
            self.write()

    def finish(self, item_id: str, status: str, seconds: float | None = None, **fields) -> None:
        with self.lock:
            if self.finished:
                return
            e = self.entries[item_id]
            e.pop("pid", None)
            e.update(status=status, **({"seconds": round(seconds, 2)} if seconds is not None else {}),
                     **{k: v for k, v in fields.items() if v is not None})
            self.write()
            self._print(e)

    def _print(self, e: dict) -> None:
        elapsed = time.monotonic() - T0
        secs = f"{e['seconds']:.1f} s" if "seconds" in e else ""
        text = e.get("error") or e.get("reason") or _brief(e.get("result"), self.by_id[e["id"]].brief)
        _say(f"[{elapsed:4.0f} s] {e['status']:<7} {e['id']:<34} {secs:>8}  {_one_line(text, 150)}")

    # -- the report
    def report(self) -> dict:
        entries = [self.entries[it.id] for it in self.items]
        bad = [f"{e['id']} ({e['status']})" for e in entries if e["status"] in ("failed", "timeout")]
        sections = {}
        for s in SECTIONS:
            states = {e["status"] for e in entries if e["section"] == s}
            sections[s] = ("failed" if states & {"failed", "timeout"} else "running" if states & {"running", "pending"}
                           else "skipped" if states <= {"skipped"} else "ok")
        return {"status": self.status, "passed": None if self.status == "running" else self.status == "passed",
                "exit_code": self.exit_code, "error": self.error, "dry_run": self.dry, "inject_failure": self.inject_failure,
                "deadline_s": self.deadline, "seconds": round(time.monotonic() - T0, 1), "env": self.env,
                "logs": sorted(Path(p).name for p in self.logs.values() if Path(p).exists()), "failures": bad,
                "sections": sections, "items": entries}

    def write(self) -> None:
        """JSON and markdown, each through a temporary file and os.replace: a reader (or a kill)
        never sees half a report."""
        with self.lock:
            rep = self.report()
            for suffix, text in ((".json", json.dumps(rep, indent=1, default=str) + "\n"), (".md", _markdown(rep))):
                path = Path(f"{self.stem}{suffix}")
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, path)

    # -- subprocesses
    def spawn(self, cmd, log_path, env=None, worker=False) -> subprocess.Popen:
        """A child in its own session (killable with its descendants) that dies with this process
        (workers see to it themselves, other commands start through ``--exec-child``), output to
        `log_path`, unbuffered: a child killed at its timeout leaves all it printed."""
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        if not worker:
            cmd = [sys.executable, str(SCRIPT), "--exec-child", str(os.getpid()), "--", *cmd]
        with self.lock:
            if self.finished:
                raise SystemExit(self.exit_code)
            with open(log_path, "ab") as log:
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            self.child = p
            if self.current is not None:  # which process to look for while it runs
                self.entries[self.current]["pid"] = p.pid
                self.write()
            return p

    def reap(self, p: subprocess.Popen) -> None:
        """Kill `p`'s process group (what it started included) and wait for it."""
        _kill_group(p)
        with self.lock:
            if self.child is p:
                self.child = None

    def run_cmd(self, cmd, log_path, timeout: float, env=None) -> tuple[int | None, bool]:
        """(exit status or None, timed out) of `cmd` under `timeout` seconds."""
        p = self.spawn(cmd, log_path, env)
        try:
            return p.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            return None, True
        finally:
            self.reap(p)

    # -- the end
    def end(self, cut_by: str, code: int) -> None:
        """Stop now (deadline or signal): kill what runs, mark the running item timeout and the
        rest skipped, write the report, exit `code`. Runs once; later calls return."""
        with self.lock:
            if self.finished:
                return
            if self.child is not None:
                _kill_group(self.child)
            now = time.monotonic()
            for e in self.entries.values():
                if e["status"] == "running":
                    took = now - T0 - e.get("started_s", 0)
                    e.pop("pid", None)
                    e.update(status="timeout", cut_by=cut_by, seconds=round(took, 2),
                             error=f"timeout ({cut_by}): cut after {took:.0f} s in this item, "
                                   f"{now - T0:.0f} s into the run (--deadline {self.deadline:.0f})")
                    self._print(e)
                elif e["status"] == "pending":
                    e.update(status="skipped", reason=f"not reached: {cut_by}")
            self.status, self.exit_code = ("deadline" if cut_by == "deadline" else "interrupted"), code
            self.write()
            self.finished = True
            _say(f"gpu_check: stopped ({cut_by}) after {now - T0:.0f} s, exit {code}; report {self.stem}.json")
            shutil.rmtree(self.tmp, ignore_errors=True)
        os._exit(code)


def _kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        p.wait(timeout=10)


def _watchdog(run: Run) -> None:
    """Ends the run at the deadline whatever the main thread is doing (waiting on a child, or
    stuck in an item of its own)."""
    while run.left() > 0:
        time.sleep(min(max(run.left(), 0.01), 0.5))
    run.end("deadline", EXIT_DEADLINE)


def _brief(result, keys=()) -> str:
    """`k=v` for the chosen (else every scalar) dotted keys of a result."""
    if not isinstance(result, dict):
        return "" if result is None else str(result)
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)) or v is None:
                flat[f"{prefix}{k}"] = v
    walk(result)
    chosen = [k for k in keys if k in flat] or [k for k in flat if "." not in k]
    return " ".join(f"{k}={flat[k]}" for k in chosen)


def _markdown(report: dict) -> str:
    env = report["env"]
    verdict = {"running": "RUNNING (or killed)", "passed": "PASS", "failed": "FAIL",
               "deadline": "FAIL (deadline)", "interrupted": "FAIL (interrupted)"}[report["status"]]
    lines = [f"# sam_fast GPU check ({'dry run, ' if report['dry_run'] else ''}{env['device']})", "",
             f"- date: {env['date']}, commit: {env['commit']}{' (dirty)' if env['dirty'] else ''}",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
             f"transformers {env['transformers']}, Python {env['python']}",
             f"- result: **{verdict}** after {report['seconds']:.0f} s (deadline {report['deadline_s']:.0f} s, "
             f"exit {report['exit_code']})", *([f"- error: {report['error']}"] if report.get("error") else []), "",
             "| section | item | status | seconds | details |", "|---|---|---|---|---|"]
    for e in report["items"]:
        details = e.get("error") or e.get("reason") or json.dumps(e.get("result", {}), default=str)
        text = str(details).replace("|", "\\|").replace("\n", " ")
        secs = f"{e['seconds']:.1f}" if "seconds" in e else ""
        lines.append(f"| {e['section']} | {e['name']} | {e['status']} | {secs} | `{text[:600]}` |")
    for e in report["items"]:
        lines += _profile_markdown(e) + _table_markdown(e)
    return "\n".join(lines) + "\n"


def _table_markdown(entry: dict) -> list[str]:
    """The table an item's result carries (``table``: title, columns, rows, note), if it has one."""
    res = entry.get("result")
    table = res.get("table") if isinstance(res, dict) else None
    if not isinstance(table, dict) or not table.get("rows"):
        return []

    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["", f"## {entry['name']}: {table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    return lines + (["", cell(table["note"])] if table.get("note") else [])


def _profile_markdown(entry: dict) -> list[str]:
    """The kernel table of an item's ``profile`` result (`kernel_summary`), if it has one."""
    prof = (entry.get("result") or {}).get("profile") if isinstance(entry.get("result"), dict) else None
    if not isinstance(prof, dict) or not prof.get("top"):
        return []
    lines = ["", f"## {entry['name']}: profile of {prof['steps']} steps ({prof['what']})", "",
             f"per step: {prof['kernel_ms_per_step']} ms in kernels of {prof['wall_ms_per_step']} ms wall "
             f"(host gap {prof['host_gap_ms_per_step']} ms, device busy {prof['device_busy']}), "
             f"{prof['launches_per_step']} launches, {prof['distinct_kernels']} distinct kernels", "",
             "| kernel | calls | total ms | % of kernel time |", "|---|---|---|---|"]
    for r in prof["top"]:
        name = str(r["name"]).replace("|", "\\|")
        lines.append(f"| `{name}` | {r['calls']} | {r['total_ms']} | {r['pct']} |")
    return lines


# ----------------------------------------------------------------------------- running the items
def _run_inline(run: Run, item: Item) -> None:
    run.start(item.id)
    run.current = item.id
    try:
        _run_inline_item(run, item)
    finally:
        run.current = None


def _run_inline_item(run: Run, item: Item) -> None:
    t0 = time.monotonic()
    try:
        if run.faults.get(item.id) == "hang" and item.id != "tests.pytest":  # pytest hangs inside pytest
            _hang(item.id)
        result = item.fn(run, item) or {}
    except _Skip as s:
        return run.finish(item.id, "skipped", time.monotonic() - t0, reason=str(s))
    except _Timeout as t:
        run.finish(item.id, "timeout", time.monotonic() - t0, result=t.result, error=str(t), cut_by=t.cut_by)
        if t.cut_by == "deadline":
            run.end("deadline", EXIT_DEADLINE)
        return
    except Exception as e:  # recorded, never fatal for the rest of the run
        return run.finish(item.id, "failed", time.monotonic() - t0, error=_one_line(f"{type(e).__name__}: {e}"))
    ok = result.pop("ok", True)
    error = None if ok else result.pop("error", None) or _check_error(result)
    run.finish(item.id, "ok" if ok else "failed", time.monotonic() - t0, result=result, error=error)


def _run_workers(run: Run, ids: list[str]) -> None:
    """Run `ids` in worker processes, one after another in one worker while it lives; an item past
    its timeout (or whose worker dies) is recorded and a fresh worker takes the rest."""
    pending = list(ids)
    n = 0
    while pending:
        n += 1
        events = run.tmp / f"{pending[0]}-{n}.jsonl"
        events.touch()
        spec = run.tmp / f"{pending[0]}-{n}.json"
        spec.write_text(json.dumps({"items": pending, "events": str(events), "dry": run.dry,
                                    "inject_failure": run.inject_failure, "parent": os.getpid(),
                                    "deadline_at": run.deadline_at, "device": run.env["device"],
                                    "timeouts": {i: run.timeout_of(i) for i in pending}}))
        cmd = [sys.executable, str(SCRIPT), "--worker", str(spec)]
        p = run.spawn(cmd, run.logs["workers"], worker=True)
        with open(run.logs["workers"], "a") as log:
            log.write(f"\n===== worker pid {p.pid} for {', '.join(pending)}\n")
        run.start(pending[0], pid=p.pid)
        head_since, started, state = time.monotonic(), set(), {"offset": 0, "buf": ""}
        all_done = False
        try:
            while pending:
                rc = p.poll()  # before reading: all it wrote before exiting is then read below
                for ev in _read_events(events, state):
                    item_id = ev["id"]
                    if ev["event"] == "start":
                        head_since = time.monotonic()
                        started.add(item_id)
                        run.start(item_id, pid=p.pid)
                    elif ev["event"] == "progress":
                        run.progress(item_id, ev["result"])
                    elif ev["event"] == "done":
                        run.finish(item_id, ev["status"], ev["seconds"],
                                   **{k: ev.get(k) for k in ("result", "error", "reason")})
                        pending.remove(item_id)
                        head_since = time.monotonic()
                if not pending:
                    all_done = True
                    break
                if rc is not None:
                    if started and pending[0] not in started:
                        break  # it stopped after an item raised, on purpose: a fresh one goes on
                    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                    run.finish(pending[0], "failed", time.monotonic() - head_since,
                               error=f"its worker process died ({how}); see {Path(run.logs['workers']).name}")
                    pending.pop(0)
                    break
                took = time.monotonic() - head_since
                if took > run.timeout_of(pending[0]):
                    run.finish(pending[0], "timeout", took, cut_by="item timeout",
                               error=f"timeout (item timeout): ran past {run.timeout_of(pending[0]):g} s; "
                                     f"its worker was killed, a fresh one runs the next items")
                    pending.pop(0)
                    break
                time.sleep(0.05)
        finally:
            if all_done and p.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)  # its clean-up after the last item
            run.reap(p)


def _read_events(path: Path, state: dict) -> list[dict]:
    """The complete JSON lines a worker appended since the last call."""
    with open(path, "rb") as f:
        f.seek(state["offset"])
        chunk = f.read()
    state["offset"] += len(chunk)
    *lines, state["buf"] = (state["buf"] + chunk.decode("utf-8", "replace")).split("\n")
    return [json.loads(line) for line in lines if line.strip()]


def _check_error(result: dict) -> str:
    """The one-line error of a check whose result holds ``ok: False`` parts."""
    parts = [f"{k}: err {v.get('err')} > budget {v.get('budget')}" for k, v in result.items()
             if isinstance(v, dict) and v.get("ok") is False]
    if "err" in result and "budget" in result:
        parts.append(f"err {result['err']} > budget {result['budget']}")
    return "outside the error budget: " + ("; ".join(parts) or _one_line(json.dumps(result, default=str), 200))


# ----------------------------------------------------------------------------- worker processes
class WorkerCtx:
    """What a worker item sees: device, dry, inject (failure), `left()` seconds and `progress()`."""

    def __init__(self, spec: dict, emit):
        self.dry, self.inject = spec["dry"], spec["inject_failure"]
        self.deadline_at, self.timeouts, self.device_name = spec["deadline_at"], spec["timeouts"], spec["device"]
        self.emit = emit
        self._device = None
        self.item, self.item_t0 = None, time.monotonic()

    @property
    def device(self):
        if self._device is None:
            import torch

            if self.dry:
                torch.set_num_threads(min(torch.get_num_threads(), 2))
            self._device = torch.device("cpu" if self.dry else "cuda")
        return self._device

    def left(self) -> float:
        """Seconds before this item's timeout or the deadline, whichever comes first."""
        now = time.monotonic()
        return min(self.timeouts[self.item] - (now - self.item_t0), self.deadline_at - now)

    def progress(self, result: dict) -> None:
        """Send what is measured so far: kept in the report if the item is cut later."""
        self.emit({"event": "progress", "id": self.item, "result": result})


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the main process dies, whatever it is doing."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call above
        os._exit(EXIT_FAILED)


def worker_main(spec_path: str) -> int:
    """Run the spec's items in order, reporting start / progress / done as JSON lines; exit after
    an item raised (a CUDA error may have broken the context: the next items get a fresh process)."""
    import faulthandler

    faulthandler.enable()  # a segfault prints the Python stack into the worker log
    spec = json.loads(Path(spec_path).read_text())
    _die_with_parent(spec["parent"])
    by_id = {it.id: it for it in plan(spec["dry"])}
    inject = injections(os.environ)
    with open(spec["events"], "a") as events:
        def emit(ev):
            events.write(json.dumps(ev, default=str) + "\n")
            events.flush()

        ctx = WorkerCtx(spec, emit)
        for item_id in spec["items"]:
            item = by_id[item_id]
            ctx.item, ctx.item_t0 = item_id, time.monotonic()
            emit({"event": "start", "id": item_id, "pid": os.getpid()})
            done = {"event": "done", "id": item_id}
            try:
                if inject.get(item_id) == "hang":
                    _hang(item_id)
                if inject.get(item_id) == "crash":
                    os.kill(os.getpid(), signal.SIGSEGV)
                left = ctx.deadline_at - time.monotonic()
                if item.estimate > left:
                    raise _Skip(f"needs ~{item.estimate:.0f} s, {max(left, 0):.0f} s left before the deadline")
                result = item.fn(ctx, **item.params) or {}
            except _Skip as s:
                emit(dict(done, status="skipped", reason=str(s), seconds=time.monotonic() - ctx.item_t0))
                continue
            except Exception as e:
                traceback.print_exc()
                emit(dict(done, status="failed", error=_one_line(f"{type(e).__name__}: {e}"),
                          seconds=time.monotonic() - ctx.item_t0))
                return EXIT_FAILED
            finally:
                _release_memory()
            ok = result.pop("ok", True)
            emit(dict(done, status="ok" if ok else "failed", result=result, seconds=time.monotonic() - ctx.item_t0,
                      error=None if ok else _check_error(result)))
    return EXIT_OK


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 1. build (in process)
def _item_pip(run: Run, item: Item) -> dict:
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4), SAM_FAST_BUILD_EXT="1")
    if run.env.get("capability") and not env.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = run.env["capability"]
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: half the nvcc work
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-build-isolation",
           "--no-deps", "--no-index", "-e", str(ROOT)]
    log = run.logs["build"]
    timeout = run.timeout_of(item.id)
    rc, timed_out = run.run_cmd(cmd, log, timeout, env)
    text = Path(log).read_text(errors="replace")
    res = {"rc": rc, "arch_list": env.get("TORCH_CUDA_ARCH_LIST"), "max_jobs": env["MAX_JOBS"], "log": Path(log).name,
           "build_lines": [ln for ln in text.splitlines() if ln.startswith("sam_fast:")][-10:]}
    if timed_out:
        raise _Timeout(f"timeout (item timeout): the build ran past {timeout:g} s; log {Path(log).name}", res)
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
    return {"ok": rc == 0, **res, **({"error": _one_line(f"pip exited {rc}: {last[0]}")} if rc else {})}


def _item_ext_info(run: Run, item: Item) -> dict:
    # a fresh interpreter: the build may have replaced sam_fast._C
    code = ("import json; from sam_fast import _ext; _ext.load(); i = _ext.info(); "
            "print('EXT_INFO ' + json.dumps({k: v for k, v in i.items() if k != 'module'}, default=str))")
    log = run.tmp / "ext_info.log"
    timeout = run.timeout_of(item.id)
    rc, timed_out = run.run_cmd([sys.executable, "-c", code], log, timeout)
    text = log.read_text(errors="replace")
    if timed_out:
        raise _Timeout(f"timeout (item timeout): importing sam_fast ran past {timeout:g} s",
                       {"output_tail": text[-500:]})
    found = [ln[len("EXT_INFO "):] for ln in text.splitlines() if ln.startswith("EXT_INFO ")]
    if rc or not found:
        last = (text.strip().splitlines() or [""])[-1]
        return {"ok": False, "error": _one_line(f"exit status {rc}: {last}"),
                "output_tail": text[-800:]}
    i = json.loads(found[-1])
    ok = bool(i.get("built")) and bool(i.get("torch_matches")) and not i.get("error")
    if not run.dry:
        ok = ok and bool(i.get("with_cuda"))  # the CUDA kernels must be in the build on a GPU machine
    return {"ok": ok, "ext": i, **({} if ok else {"error": _one_line(f"extension not usable: {i}")})}


# ----------------------------------------------------------------------------- 5. tests (in process)
_HANG_PLUGIN = "def pytest_sessionstart(session):\n    import time\n    while True:\n        time.sleep(3600)\n"


def _item_pytest(run: Run, item: Item) -> dict:
    import importlib.util

    selected = [t for t in CUDA_TESTS if (ROOT / t.split("::")[0]).exists()]
    missing = sorted(set(CUDA_TESTS) - set(selected))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--benchmark-disable"]
    cmd += ["--collect-only", "-q"] if run.dry else ["-v", "-rfE", "--tb=short"]
    per_test = not run.dry and importlib.util.find_spec("pytest_timeout") is not None
    if per_test:
        cmd += [f"--timeout={PYTEST_PER_TEST_TIMEOUT}"]
    if run.faults.get(item.id) == "hang":  # test-only: pytest itself hangs, as a hung CUDA test would
        (run.tmp / "_gpu_check_hang.py").write_text(_HANG_PLUGIN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(run.tmp), env.get("PYTHONPATH")]))
        cmd += ["-p", "_gpu_check_hang"]
    log = run.logs["pytest"]
    left = run.left() - PYTEST_DEADLINE_MARGIN
    if left < item.estimate:
        raise _Skip(f"{max(run.left(), 0):.0f} s left before the deadline, pytest needs ~{item.estimate:.0f} "
                    f"plus {PYTEST_DEADLINE_MARGIN:.0f}")
    timeout = min(run.timeout_of(item.id), left)
    cut_by = "deadline" if timeout < run.timeout_of(item.id) else "item timeout"
    t0 = time.monotonic()
    rc, timed_out = run.run_cmd(cmd + selected, log, timeout, env)
    out = Path(log).read_text(errors="replace")
    info = {"log": Path(log).name, "selection": selected, "missing_files": missing, "rc": rc,
            "per_test_timeout_s": PYTEST_PER_TEST_TIMEOUT if per_test else None,
            "wall_s": round(time.monotonic() - t0, 1)}
    summary = [ln.strip("= ") for ln in out.splitlines() if re.search(r"\bin \d+(\.\d+)?s\b", ln)]
    info["summary"] = summary[-1] if summary else None
    if run.dry:
        ids = [line for line in out.splitlines() if "::" in line]
        info.update(collected=len(ids))
    else:
        info["counts"] = {k: len(re.findall(rf" {k}\b", out)) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        info["failed"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)[:50]
    if timed_out:
        counts = info.get("counts") or {"collected": info.get("collected")}
        last = [ln.split()[0] for ln in out.splitlines() if "::" in ln and ln.strip()][-1:]
        info["last_test_seen"] = last[0] if last else None
        raise _Timeout(f"timeout ({cut_by}): pytest ran past {timeout:g} s and was killed; before the cut: {counts}; "
                       f"last test seen: {info['last_test_seen']} (log {Path(log).name})", info, cut_by)
    if run.dry:
        info["ok"] = rc == 0 and info["collected"] > 0
    else:
        info["ok"] = rc == 0
    if not info["ok"]:
        info["error"] = _one_line(f"pytest exit {rc}: {info['summary'] or 'no summary line'}; "
                                  f"failed: {' '.join(info.get('failed', [])[:5])}")
    return info


# ----------------------------------------------------------------------------- 4. model checks (workers)
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


COUNTS = [2, 3, 1]  # images per sample in the model checks


def _check_reweight(ctx: WorkerCtx, backend: str, dtype: str) -> dict:
    """The re-weighting op on one device backend, forward + backward, against float64."""
    import torch

    from sam_fast.ops import context_reweight
    from sam_fast.ops.dispatch import dispatcher

    device, dt = ctx.device, getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    T, P, D = sum(COUNTS), 37, 64
    V64 = torch.randn(T, P, D, generator=g, dtype=torch.float64)
    s64 = torch.randn(T, P, generator=g, dtype=torch.float64) * 3
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    up = torch.randn(T, P, D, generator=g, dtype=torch.float64)
    why = dict(dispatcher("context_reweight").reasons(V64.to(device, dt), s64.float().to(device), cu.to(device),
                                                    "leave_one_out"))
    if why.get(backend) is not None:
        raise _Skip(f"backend {backend} cannot run here: {why[backend]}")

    def fwd_bwd(V, s, name):
        V, s = (t.detach().requires_grad_() for t in (V, s))
        with _backend(name):
            out = context_reweight(V, s, cu.to(V.device), "leave_one_out")
        grads = torch.autograd.grad(out, (V, s), up.to(out.device, out.dtype))
        return [out.detach(), *grads]

    oracle = fwd_bwd(V64, s64, "reference")
    args = [V64.to(device, dt), s64.float().to(device)]  # the model's scores are fp32
    plain = fwd_bwd(*args, "reference")
    fast = fwd_bwd(*args, backend)
    if ctx.inject:
        fast[0] = fast[0] + 1.0
    res = {n: within_budget(f, p, o, dtype) for n, f, p, o in zip(("out", "dV", "ds"), fast, plain, oracle)}
    return {"ok": all(r["ok"] for r in res.values()), **res}


def _check_encode(ctx: WorkerCtx, mode: str, dtype: str) -> dict:
    """encode_images against the one-image-at-a-time reference."""
    import copy

    import torch

    from sam_fast.reference import reference_encode_images

    device, dt = ctx.device, getattr(torch, dtype)
    model = _tiny_model(mode, interaction_layers=(1, 4))
    feats, ids, mask = _ragged(model, COUNTS)
    with torch.no_grad():
        om = copy.deepcopy(model).double()
        om.adaptive_adjustment.float()  # the reference merges in fp32
        oracle = reference_encode_images(om, feats.double(), COUNTS, ids, mask)
        m = _lowp(model, device, dt)
        f, i, k = feats.to(device, dt), ids.to(device), mask.to(device)
        fast = m.encode_images(image_features=f, image_counts=COUNTS, qformer_input_ids=i, qformer_attention_mask=k)
        plain = reference_encode_images(m, f, COUNTS, i, k)
    if ctx.inject:
        fast = fast + 1.0
    return within_budget(fast, plain, oracle, dtype)


def _check_packed(ctx: WorkerCtx, mode: str) -> dict:
    """The packed training step (default) against the padded HF call: loss and trainable gradients."""
    import copy

    import torch

    from sam_fast.bench_plan import realistic_batch

    device = ctx.device
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
    if ctx.inject:
        fast[0] = fast[0] + 1.0
    res = {n: within_budget(f, p, o, "float32") for n, f, p, o in zip(("loss", "grads"), fast, plain, oracle)}
    return {"ok": all(r["ok"] for r in res.values()), "loss": float(fast[0]), **res}


def _check_compile(ctx: WorkerCtx) -> dict:
    """torch.compile over encode_images matches eager (GPU only)."""
    import torch

    device = ctx.device
    if device.type != "cuda":
        raise _Skip("no CUDA: torch.compile is exercised on the GPU only")
    torch._dynamo.reset()
    model = _tiny_model("leave_one_out", interaction_layers=(1, 4)).to(device)
    feats, ids, mask = (t.to(device) for t in _ragged(model, COUNTS))
    fn = torch.compile(model.encode_images)
    with torch.no_grad():
        eager = model.encode_images(image_features=feats, image_counts=COUNTS, qformer_input_ids=ids,
                                    qformer_attention_mask=mask)
        out = fn(image_features=feats, image_counts=COUNTS, qformer_input_ids=ids, qformer_attention_mask=mask)
    err = _err(out, eager)
    return {"ok": err <= 1e-4 * max(eager.abs().max().item(), 1.0), "max_abs_diff_vs_eager": f"{err:.3g}"}


# ----------------------------------------------------------------------------- 2-3. benchmarks (workers)
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


def _rounds(ctx: WorkerCtx) -> tuple[int, int]:
    return (1, 1) if ctx.dry else (3, 10)


def _bench_reweight(ctx: WorkerCtx) -> dict:
    import torch

    from sam_fast.ops import context_reweight

    device, timer, (warm, rounds) = ctx.device, Timer(ctx.device), _rounds(ctx)
    B, N, P, D = (2, 3, 5, 16) if ctx.dry else (4, 8, 257, 1408)
    res = {"shape": [B, N, P, D]}
    for dtype in (torch.float32, torch.bfloat16):
        F = torch.randn(B * N, P, D, device=device, dtype=dtype)
        s = torch.randn(B * N, P, device=device)
        cu = torch.arange(0, B * N + 1, N, dtype=torch.int32, device=device)
        offs = cu.tolist()
        dst = torch.empty_like(F)
        nbytes = 2 * F.numel() * F.element_size()
        with torch.no_grad():
            t = timer(lambda: context_reweight(F, s, cu, "leave_one_out", offsets=offs), warm, rounds)
            tc = timer(lambda: dst.copy_(F), warm, rounds)
        res[_dtype_name(dtype)] = {"ms": round(t, 4), "gbps": round(nbytes / t / 1e6, 1),
                                   "copy_gbps": round(nbytes / tc / 1e6, 1), "time_vs_copy": round(t / tc, 2)}
    return res


def _bench_streams(ctx: WorkerCtx) -> dict:
    import torch

    from sam_fast.ops import cross_attention_streams, cross_attention_streams_ref, mix_kv

    device, timer, (warm, rounds) = ctx.device, Timer(ctx.device), _rounds(ctx)
    bf16 = torch.bfloat16
    T, Q, H, d, P, N = (4, 8, 2, 16, 5, 2) if ctx.dry else (8, 32, 12, 64, 257, 4)
    res = {"shape": {"images": T, "Q": Q, "H": H, "d": d, "P": P}}
    for dtype in (bf16,) if ctx.dry else (bf16, torch.float32):
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


def _bench_encode(ctx: WorkerCtx) -> dict:
    import torch

    from sam_fast.reference import released_schedule_encode_images

    device, timer, (warm, rounds) = ctx.device, Timer(ctx.device), _rounds(ctx)
    bf16 = torch.bfloat16
    res = {}
    for mode in ("leave_one_out", "shared"):
        model = _lowp(_tiny_model(mode), device, bf16) if ctx.dry else _encode_model(mode, device, bf16)
        vc = model.config.vision_config
        P = (vc.image_size // vc.patch_size) ** 2 + 1
        for n in (2, 4, 8):
            if ctx.left() < (1 if ctx.dry else 8):
                res[f"{mode}_N{n}"] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time"
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
            ctx.progress(res)
        del model
    return res


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


def _model_7b(ctx: WorkerCtx, need_gib: int):
    """The Vicuna-7B config (tiny in a dry run) with random bf16 weights on the device, and the
    realistic B = 8 batch: (model, batch, shapes, result so far)."""
    import torch

    from sam_fast import SAM, SAMConfig
    from sam_fast.bench_plan import realistic_batch

    device, dtype = ctx.device, torch.bfloat16
    if ctx.dry:
        cfg = SAMConfig.tiny()
    else:
        free = _free_bytes(device)
        if free is not None and free < need_gib * 2**30:
            raise _Skip(f"{free / 2**30:.0f} GiB free on the device, this item needs ~{need_gib}")
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
    res = {"config": "tiny" if ctx.dry else "instructblip_vicuna7b", "init_s": round(time.monotonic() - t0, 1)}
    shapes = _shapes(model.config, 8)
    batch = realistic_batch(model.config, shapes, seed=0)
    batch = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    res.update(batch_size=len(shapes), llm_tokens=int(batch["attention_mask"].sum()),
               images=sum(batch["image_counts"]))
    return model, batch, shapes, res


def useful_flops(config, shapes) -> dict:
    """Model FLOPs of one training step (`sam_fast.bench_plan.model_flops`: the work the step has to
    do, whichever schedule does it: real tokens, LM head at the supervised rows, nothing recomputed);
    "pixels" from images, "cached" from cached ViT features (no ViT forward)."""
    from sam_fast.bench_plan import model_flops

    f = model_flops(config, shapes)
    return {"pixels": f["total"], "cached": f["total"] - f["vit"]}


PROFILE_STEPS = 3  # profiled training steps, after the timed ones (warm)
PROFILE_TOP = 15  # kernel rows in the report; the rest is one "other" row
PROFILE_NAME_CHARS = 80


def short_kernel_name(name: str, limit: int = PROFILE_NAME_CHARS) -> str:
    """A kernel's name fit for one table cell: without ``void `` and the parameter list, cut to
    `limit` characters (C++ kernel names run to hundreds of characters of template arguments)."""
    name = " ".join(str(name).split()).removeprefix("void ")
    if name.endswith(")") and "(" in name:
        name = name[: name.index("(")] or name
    return name if len(name) <= limit else name[: limit - 3] + "..."


def profile_records(prof) -> tuple[list[tuple[str, float]], str]:
    """((name, microseconds) per event, what they are) of a finished torch.profiler profile: its
    device kernels (CUDA: kernels, memcpy and memset), else (a CPU-only profile) its CPU ops by
    their self time, so that either way the times add up to the busy time without double counting."""
    from torch.autograd import DeviceType

    events = list(prof.events() or [])
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type != DeviceType.CPU]
    if kernels:
        return kernels, "device kernels"
    return [(e.name, e.self_cpu_time_total) for e in events
            if e.device_type == DeviceType.CPU and not e.is_async], "cpu ops (self time)"


def kernel_summary(records, what: str, steps: int, wall_ms: float, top: int = PROFILE_TOP,
                   name_chars: int = PROFILE_NAME_CHARS) -> dict:
    """The profile of `steps` steps that took `wall_ms` in all: the `top` kernels by total time
    (short name, calls, total ms, % of all kernel time; the rest in one "other" row, so the
    percentages add up to 100), kernel time and wall time per step, the host gap between them
    (wall - kernel: time the device waited on the host) and kernel launches per step."""
    totals: dict[str, list] = {}
    for name, us in records:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += float(us)
    busy = sum(us for _, us in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])

    def row(name, calls, us):
        return {"name": name, "calls": calls, "total_ms": round(us / 1e3, 3),
                "pct": round(100 * us / busy, 2) if busy else 0.0}

    rows = [row(short_kernel_name(name, name_chars), calls, us) for name, (calls, us) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append(row(f"other ({len(rest)} kernels)", sum(c for _, (c, _) in rest), sum(u for _, (_, u) in rest)))
    steps = max(int(steps), 1)
    kernel_ms, wall = busy / 1e3 / steps, wall_ms / steps
    return {"what": what, "steps": steps, "top": rows, "kernel_ms_per_step": round(kernel_ms, 3),
            "wall_ms_per_step": round(wall, 3), "host_gap_ms_per_step": round(wall - kernel_ms, 3),
            "device_busy": round(kernel_ms / wall, 3) if wall > 0 else None,
            "launches_per_step": round(len(records) / steps, 1), "distinct_kernels": len(totals)}


def profile_step(step, device, steps: int = PROFILE_STEPS) -> dict:
    """`kernel_summary` of `steps` calls of `step` (already warm) under torch.profiler (device
    kernels only on CUDA: the CPU op events would add host overhead and parsing time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    records, what = profile_records(prof)
    return kernel_summary(records, what, steps, wall_ms)


def _item_train_step(ctx: WorkerCtx) -> dict:
    """One training step from pixels, from cached features and with the released schedule: time,
    tokens/s, peak memory, model FLOP rate and MFU."""
    import torch

    sys.path.insert(0, str(ROOT / "bench" / "e2e"))
    import _setup  # bench/e2e/_setup.py: step functions

    device, timer = ctx.device, Timer(ctx.device)
    model, batch, shapes, res = _model_7b(ctx, 60)
    model.train()
    tokens = res["llm_tokens"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    flops = useful_flops(model.config, shapes)
    peak, peak_source = peak_tflops(ctx.device_name)
    res.update(model_tflop={k: float(f"{v / 1e12:.4g}") for k, v in flops.items()}, peak_tflops=peak,
               peak_source=peak_source)
    cuda = device.type == "cuda"
    cached = _setup.features(model, batch["pixel_values"])
    steps = (("sam_fast", _setup.step_sam_fast, "pixels"),
             ("cached", lambda m, o, b: _setup.step_cached(m, o, b, cached), "cached"),
             ("released", _setup.step_released, "pixels"))
    for name, step, work in steps:
        if not ctx.dry and ctx.left() < 20:
            res[name] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time"
            continue
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timer(lambda: step(model, opt, batch), warmup=1, rounds=1 if ctx.dry else 3)
        rate = flops[work] / (ms / 1e3) / 1e12
        res[name] = {"step_ms": round(ms, 1), "tokens_per_s": round(tokens / ms * 1e3, 1),
                     "tflops_per_s": float(f"{rate:.4g}"), "mfu": float(f"{rate / peak:.4g}") if peak else None}
        if cuda:
            res[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if name == "sam_fast" and model.recompute_qformer_choice is not None:
            res["recompute_qformer"] = dict(zip(("recompute", "why"), model.recompute_qformer_choice))
        ctx.progress(res)
    if isinstance(res.get("sam_fast"), dict) and isinstance(res.get("released"), dict):
        res["speedup_vs_released"] = round(res["released"]["step_ms"] / res["sam_fast"]["step_ms"], 2)
    if isinstance(res.get("cached"), dict) and isinstance(res.get("released"), dict):
        res["cached_speedup_vs_released"] = round(res["released"]["step_ms"] / res["cached"]["step_ms"], 2)
    ctx.progress(res)  # kept if the profile below is cut by the item's timeout
    res["profile"] = _profile_sam_fast(ctx, lambda: _setup.step_sam_fast(model, opt, batch))
    return res


def _item_train_step_compiled(ctx: WorkerCtx) -> dict:
    """The sam_fast step from pixels as one compiled graph (`SAM.compile_training_step`), in
    torch.compile's default mode and as CUDA graphs ("reduce-overhead"): the first call's seconds
    (compilation) apart, then step time and MFU as `bench.train_step` times them. A dry run compiles
    with the "eager" backend (no code generation) and skips CUDA graphs."""
    import torch

    sys.path.insert(0, str(ROOT / "bench" / "e2e"))
    import _setup  # bench/e2e/_setup.py: step functions

    model, batch, shapes, res = _model_7b(ctx, 60)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    flops, (peak, _) = useful_flops(model.config, shapes)["pixels"], peak_tflops(ctx.device_name)
    for mode in (None, "reduce-overhead"):
        name = mode or "default"
        if ctx.dry and mode is not None:
            res[name] = "skipped: dry run (CUDA graphs need CUDA)"
        elif not ctx.dry and ctx.left() < 60:
            res[name] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time"
        else:
            res[name] = _compiled_variant(ctx, model, lambda: _setup.step_sam_fast(model, opt, batch), mode, flops,
                                          peak)
        ctx.progress(res)
    return res


def _compiled_variant(ctx: WorkerCtx, model, step, mode, flops: float, peak) -> dict | str:
    """Compile the whole step in `mode`, run it once (compile_s), time it; or the one-line failure."""
    import torch

    try:
        model.compile_training_step(mode=mode, **({"backend": "eager"} if ctx.dry else {}))
        t0 = time.monotonic()
        step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.monotonic() - t0
        ms = Timer(ctx.device)(step, warmup=1, rounds=1 if ctx.dry else 3)
    except Exception as exc:  # a compile failure is a finding, not the end of the run
        return f"failed: {_one_line(f'{type(exc).__name__}: {exc}')}"
    finally:
        model.compile_training_step(enable=False)
        torch._dynamo.reset()
    rate = flops / (ms / 1e3) / 1e12
    return {"compile_s": round(compile_s, 1), "step_ms": round(ms, 1), "tflops_per_s": float(f"{rate:.4g}"),
            "mfu": float(f"{rate / peak:.4g}") if peak else None}


def _profile_sam_fast(ctx: WorkerCtx, step):
    """`profile_step` of the sam_fast step from pixels, or why not (too little time left, or the
    profiler failed: the timings above stand either way)."""
    need = 5 if ctx.dry else 30
    if ctx.left() < need:
        return f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time, needs ~{need}"
    try:
        return profile_step(step, ctx.device)
    except Exception as e:  # a profiler that cannot start here (CUPTI missing, ...) costs only its table
        return _one_line(f"failed: {type(e).__name__}: {e}")


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


def _item_generate(ctx: WorkerCtx) -> dict:
    """5-beam generation tokens/s, ``hf``, ``lavis`` and ``hf`` with HF's static cache."""
    import torch

    timer = Timer(ctx.device)
    model, batch, shapes, res = _model_7b(ctx, 30)
    model.eval()
    prompts = _prompts(model, batch)
    del batch
    new = 4 if ctx.dry else 32
    # hf_static: HF's fixed-shape KV cache, whose decoding step HF's generate compiles on a GPU
    # (the warm-up call pays the compilation); its ids must equal the dynamic cache's
    hf_ids = None
    for mode, need in (("hf", 15), ("lavis", 15), ("hf_static", 90)):
        if not ctx.dry and ctx.left() < need:
            res[f"generate_{mode}"] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time, needs ~{need}"
            continue
        kw = dict(num_beams=5, max_new_tokens=new, generation_mode=mode.split("_")[0])
        if mode.startswith("hf"):
            kw["min_new_tokens"] = new  # a random model's early EOS would shorten the timing
        else:
            kw["min_length"] = new + 1
        if mode == "hf_static":
            kw["cache_implementation"] = "static"
        out = []
        ms = timer(lambda: out.append(model.generate(**prompts, **kw)), warmup=1, rounds=1 if ctx.dry else 2)
        made = int(out[-1].shape[0] * out[-1].shape[1])
        res[f"generate_{mode}"] = {"ms": round(ms, 1), "new_tokens": made, "tokens_per_s": round(made / ms * 1e3, 1)}
        if mode == "hf":
            hf_ids = out[-1]
        elif mode == "hf_static" and hf_ids is not None:
            res[f"generate_{mode}"]["same_ids_as_hf"] = bool(torch.equal(out[-1], hf_ids))
        ctx.progress(res)
    return res


# ----------------------------------------------------------------------------- 3. decisions (workers)
# Each call of a fwd+bwd below is timed over many back-to-back calls (the GPU queue stays full
# unless the host is the bottleneck, which then shows) and, on a GPU, once more replayed from a
# CUDA graph (device time without the host's launch overhead).
DECISION_TIMING = {"dry": (1, 2, 1), "gpu": (3, 20, 5)}  # (warm-up calls, calls per round, rounds)
BF16_AGREE = 2.0**-6  # max |a - b| / max |b|: a few bf16 roundings (eps 2^-8) apart


def per_call_ms(fn, device, calls: int, rounds: int, warmup: int = 2) -> float:
    """Median over `rounds` of the milliseconds per call of `calls` back-to-back calls of fn,
    after `warmup` calls: CUDA events around each round on a GPU, perf_counter on a CPU."""
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def graph_ms(fn, calls: int, rounds: int) -> float:
    """`per_call_ms` of fn captured once in a CUDA graph and replayed (warmed up on a side stream
    first, as capture requires); raises whatever capture raises."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return per_call_ms(graph.replay, torch.device("cuda"), calls, rounds)


def max_rel_diff(ours, theirs) -> float:
    """max over pairs of max |a - b| / max |b| (b: `ours`), in float64."""
    worst = 0.0
    for a, b in zip(theirs, ours):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30))
    return worst


def xattn_case(config, counts, mode: str, dtype, device, seed: int = 0) -> dict:
    """One batch's inputs to every Q-former cross-attention layer at the model's shapes: the K/V of
    all cross layers (frozen, `project_cross_kv`'s [T, P, n_cross*2*H*d] layout), the Adaptive
    Adjustment's fp32 scores (trainable upstream), per layer the query rows of both streams (only
    the Q query rows cross-attend; the instruction's text rows do not) with their upstream
    gradient, and what is built on the host: the mixing plan, `context_reweight`'s segments.
    leave_one_out: one W row per image of a multi-image sample, mixing the sample's other images;
    shared: one W row per sample (the cross layers run before layer l, where its rows fan out),
    mixing all its images."""
    import torch

    qc, vc = config.qformer_config, config.vision_config
    H, Q = qc.num_attention_heads, config.num_query_tokens
    d = qc.hidden_size // H
    n_cross = sum(1 for i in range(qc.num_hidden_layers) if i % qc.cross_attention_frequency == 0)
    P, T = (vc.image_size // vc.patch_size) ** 2 + 1, sum(counts)
    starts = [sum(counts[:b]) for b in range(len(counts))]
    if mode == "leave_one_out":
        rows = [(s, n, i) for s, n in zip(starts, counts) if n > 1 for i in range(s, s + n)]
        groups = [[m for m in range(s, s + n) if m != i] for s, n, i in rows]
        w_images = [i for _, _, i in rows]
    else:
        groups, w_images = [list(range(s, s + n)) for s, n in zip(starts, counts)], None
    R, M = len(groups), max(len(g) for g in groups)
    torch.manual_seed(seed)
    on = dict(device=device)
    case = dict(mode=mode, H=H, d=d, Q=Q, P=P, T=T, R=R, M=M, n_cross=n_cross, counts=list(counts),
                buf=torch.randn(T, P, n_cross * 2 * H * d, dtype=dtype, **on),
                scores=(torch.randn(T, P, **on) * 2).requires_grad_(),
                qs=[torch.randn(T + R, H, Q, d, dtype=dtype, **on).requires_grad_() for _ in range(n_cross)],
                index=torch.tensor([g + [g[0]] * (M - len(g)) for g in groups], dtype=torch.int32, **on),
                live=torch.tensor([[True] * len(g) + [False] * (M - len(g)) for g in groups], **on)[:, :, None],
                cu=torch.tensor(starts + [T], dtype=torch.int32, **on), offsets=starts + [T],
                w_images=torch.tensor(w_images, **on) if w_images is not None and R < T else None)
    case["index_long"] = case["index"].reshape(-1).long()
    case["grads"] = [torch.randn_like(q) for q in case["qs"]]
    return case


def xattn_fused_mix(case) -> list:
    """(a) Per cross layer one launch of the fused streams kernel over both streams, the W rows'
    K/V mixed inside it from the images' K/V (`cross_attention_streams` with a mixing plan whose
    weights are the softmax of the scores over each row's images)."""
    import torch

    from sam_fast.modules.qformer import CrossKV
    from sam_fast.ops import cross_attention_streams

    picked = case["scores"].index_select(0, case["index_long"]).view(case["R"], case["M"], case["P"])
    weight = torch.softmax(picked.masked_fill(~case["live"], float("-inf")), dim=1)
    kv = CrossKV(case["buf"], case["H"], case["H"] * case["d"])
    return [cross_attention_streams(q, *kv.layer(c), *kv.layer(c), mix=(case["index"], weight))
            for c, q in enumerate(case["qs"])]


def xattn_materialised_sdpa(case) -> list:
    """(b) The W rows' K/V of every cross layer materialised once (`context_reweight` of the K/V
    buffer), laid out with the images' K/V as one contiguous [N, H, P, d] pair per layer (one
    copy), then per cross layer one SDPA call over both streams."""
    from sam_fast.ops import context_reweight
    from sam_fast.ops.cross_attention import cross_attention_ref

    buf, T, H, d, n, P = case["buf"], case["T"], case["H"], case["d"], case["n_cross"], case["P"]
    hat = context_reweight(buf, case["scores"], case["cu"], case["mode"], offsets=case["offsets"])
    if case["w_images"] is not None:
        hat = hat.index_select(0, case["w_images"])
    kv = buf.new_empty(n, 2, T + hat.shape[0], H, P, d)
    kv[:, :, :T] = buf.view(T, P, n, 2, H, d).permute(2, 3, 0, 4, 1, 5)
    kv[:, :, T:] = hat.view(-1, P, n, 2, H, d).permute(2, 3, 0, 4, 1, 5)
    return [cross_attention_ref(q, kv[c, 0], kv[c, 1]) for c, q in enumerate(case["qs"])]


XATTN_VARIANTS = {"fused_mix": xattn_fused_mix, "materialised_sdpa": xattn_materialised_sdpa}


def xattn_step(variant, case) -> list:
    """Forward and backward of one variant: the outputs, then the gradients of the scores and of
    every layer's query rows."""
    import torch

    outs = variant(case)
    grads = torch.autograd.grad(outs, [case["scores"], *case["qs"]], case["grads"])
    return [o.detach() for o in outs] + list(grads)


def _faster(row: dict, suffix: str = "") -> dict:
    """Which variant of a row is faster in its ``*{suffix}_ms`` timings and by how much (the slower
    time over the faster); {} where one is missing."""
    times = [(row.get(f"{name}{suffix}_ms"), name) for name in XATTN_VARIANTS]
    if any(not t for t, _ in times):
        return {}
    (fast, winner), (slow, _) = sorted(times)
    return {f"faster{suffix}": winner, f"by{suffix}": round(slow / fast, 2)}


def xattn_row(ctx: WorkerCtx, case: dict, timing) -> dict:
    """Both variants on one case: ms per forward + backward, eagerly and (CUDA) replayed from a
    graph (a capture that fails costs only its number), whether they agree, which is faster and
    by how much. A row decides only where the fused variant ran the Triton kernel."""
    import torch

    from sam_fast.ops.cross_attention import streams_backend

    warm, calls, rounds = timing
    backend = streams_backend(case["H"], case["d"], case["buf"].dtype, ctx.device, mixed=True)
    row = {"fused_backend": backend, "decides": backend == "triton", "w_rows": case["R"], "mix_slots": case["M"]}
    out = {name: xattn_step(v, case) for name, v in XATTN_VARIANTS.items()}
    row["max_rel_diff"] = float(f"{max_rel_diff(out['materialised_sdpa'], out['fused_mix']):.3g}")
    del out
    for name, v in XATTN_VARIANTS.items():
        row[f"{name}_ms"] = round(per_call_ms(lambda v=v: xattn_step(v, case), ctx.device, calls, rounds, warm), 4)
    row.update(_faster(row))
    if ctx.device.type != "cuda":
        return row
    for name, v in XATTN_VARIANTS.items():
        try:
            row[f"{name}_graph_ms"] = round(graph_ms(lambda v=v: xattn_step(v, case), calls, rounds), 4)
        except Exception as e:  # not capturable (a host sync, a launch off the capturing stream)
            row.setdefault("graph_error", {})[name] = _one_line(f"{type(e).__name__}: {e}", 200)
            torch.cuda.synchronize()
    row.update(_faster(row, "_graph"))
    return row


def xattn_verdict(rows: dict) -> dict:
    """The decision from the rows ({"mode/dtype": row, or a "skipped: ..." string}):
    ``one_algorithm`` the variant that every deciding row picks, eagerly and under graph replay
    (None: it depends on the mode, dtype or timing), ``summary`` the winners and factors in words."""
    done = {k: r for k, r in rows.items() if isinstance(r, dict)}
    deciding = {k: r for k, r in done.items() if r.get("decides")}
    if not deciding:
        backends = sorted({r["fused_backend"] for r in done.values()}) or ["none ran"]
        return {"decided": False, "one_algorithm": None,
                "summary": f"not decided: the fused kernel did not run (streams backend {', '.join(backends)})"}
    picks = {r[k] for r in deciding.values() for k in ("faster", "faster_graph") if r.get(k)}
    parts = [f"{k}: {r['faster']} {r['by']}x" + (f" (graph {r['faster_graph']} {r['by_graph']}x)"
                                                 if r.get("faster_graph") else "") for k, r in deciding.items()]
    missing = len(rows) - len(deciding)
    return {"decided": True, "one_algorithm": picks.pop() if len(picks) == 1 else None,
            "summary": "; ".join(parts) + (f"; {missing} row(s) did not decide" if missing else "")}


def xattn_table(rows: dict, verdict: dict) -> dict:
    """The rows as a markdown table (`_table_markdown`), the verdict under it."""
    cols = ["mode/dtype", "fused_mix ms", "materialised_sdpa ms", "faster", "by", "graph fused_mix ms",
            "graph materialised_sdpa ms", "graph faster", "graph by", "max rel diff"]
    keys = ["fused_mix_ms", "materialised_sdpa_ms", "faster", "by", "fused_mix_graph_ms", "materialised_sdpa_graph_ms",
            "faster_graph", "by_graph", "max_rel_diff"]
    body = [[k, *(r.get(c, "") for c in keys)] if isinstance(r, dict) else [k, r, *[""] * (len(keys) - 1)]
            for k, r in rows.items()]
    return {"title": "fwd+bwd of every cross layer for one batch, ms",
            "columns": cols, "rows": body, "note": f"verdict: {verdict['summary']}"}


def _bench_xattn_decision(ctx: WorkerCtx) -> dict:
    """Cross-attention, one algorithm per device: `xattn_fused_mix` against
    `xattn_materialised_sdpa`, forward + backward of every cross layer for one realistic batch
    (Vicuna-7B config's Q-former; the B = 8 batch's images), per context mode and dtype."""
    import torch

    from sam_fast import SAMConfig
    from sam_fast.bench_plan import realistic_shapes

    cfg = SAMConfig.tiny() if ctx.dry else SAMConfig.instructblip_vicuna7b()
    counts = [2, 3, 1] if ctx.dry else [s.images for s in realistic_shapes(0, 8)]
    timing = DECISION_TIMING["dry" if ctx.dry else "gpu"]
    res = {"rows": {}}
    for mode in ("leave_one_out", "shared"):
        for dt in (torch.bfloat16,) if ctx.dry else (torch.bfloat16, torch.float32):
            key = f"{mode}/{_dtype_name(dt)}"
            if ctx.left() < (1 if ctx.dry else 15):
                res["rows"][key] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time"
                continue
            case = xattn_case(cfg, counts, mode, dt, ctx.device)
            res["shape"] = {k: case[k] for k in ("T", "Q", "H", "d", "P", "n_cross")}
            res["rows"][key] = xattn_row(ctx, case, timing)
            del case
            ctx.progress(res)
    res["verdict"] = xattn_verdict(res["rows"])
    res["table"] = xattn_table(res["rows"], res["verdict"])
    return res


# Liger-Kernel beside ours: its public names (called, never copied), per op
LIGER_NAMES = {"rms_norm": ("liger_kernel.transformers.rms_norm", "LigerRMSNorm"),
               "swiglu": ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"),
               "rope": ("liger_kernel.transformers.rope", "liger_rotary_pos_emb"),
               "fused_linear_cross_entropy": ("liger_kernel.transformers.fused_linear_cross_entropy",
                                              "LigerFusedLinearCrossEntropyLoss")}


def liger_api() -> tuple[dict, str | None]:
    """({op: Liger's class or function}, its version); `_Skip` saying why where liger_kernel (or one
    of these names) cannot be imported, so that its absence costs the run nothing."""
    import importlib
    from importlib import metadata

    api = {}
    for op, (module, name) in LIGER_NAMES.items():
        try:
            api[op] = getattr(importlib.import_module(module), name)
        except Exception as e:  # not installed, too old, or broken
            raise _Skip(f"liger_kernel not importable ({_one_line(f'{type(e).__name__}: {e}', 200)})") from None
    try:
        version = metadata.version("liger-kernel")
    except Exception:  # imported from a path, not installed as a distribution
        version = getattr(sys.modules.get("liger_kernel"), "__version__", None)
    return api, version


def liger_case(text_config, lengths, supervised: int, dtype, device, seed: int = 0) -> dict:
    """Inputs at the LLaMA's shapes for one packed batch of samples of `lengths` tokens (positions
    restart per sample) with `supervised` loss rows: activations are leaves that take a gradient,
    weights are frozen (as SAM's LLM)."""
    import torch

    tc = text_config
    D, F, heads, V = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.vocab_size
    hd = getattr(tc, "head_dim", None) or D // heads
    theta = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta") or getattr(tc, "rope_theta", 1e4)
    tokens = sum(lengths)
    torch.manual_seed(seed)
    on = dict(device=device, dtype=dtype)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths]).double()
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=device).double() / hd)
    angle = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]  # [1, tokens, hd], as LlamaRotaryEmbedding

    def leaf(*shape):
        return torch.randn(*shape, **on).requires_grad_()

    return dict(D=D, F=F, heads=heads, head_dim=hd, V=V, eps=tc.rms_norm_eps, tokens=tokens, supervised=supervised,
                x=leaf(tokens, D), norm_w=1 + 0.1 * torch.randn(D, **on), gate=leaf(tokens, F), up=leaf(tokens, F),
                q=leaf(1, tokens, heads * hd), k=leaf(1, tokens, heads * hd), cos=angle.cos().to(dtype),
                sin=angle.sin().to(dtype), hidden=leaf(supervised, D), lm_w=torch.randn(V, D, **on) * 0.02,
                targets=torch.randint(0, V, (supervised,), device=device))


def _liger_rms_norm(api, c):
    """(inputs, ours, liger, our backend): Liger's module holds our frozen weight; not in place
    where the release lets us say so (in place, its backward overwrites the incoming gradient)."""
    import torch

    from sam_fast.ops.llama import rms_norm, rms_norm_backend

    try:
        mod = api["rms_norm"](c["D"], eps=c["eps"], in_place=False)
    except TypeError:  # a release without in_place
        mod = api["rms_norm"](c["D"], eps=c["eps"])
    mod = mod.to(c["norm_w"].device, c["norm_w"].dtype)
    with torch.no_grad():
        mod.weight.copy_(c["norm_w"])
    mod.weight.requires_grad_(False)
    backend = rms_norm_backend(c["x"].device, c["x"].dtype, c["D"])[0]
    return [c["x"]], lambda x: [rms_norm(x, c["norm_w"], c["eps"])], lambda x: [mod(x)], backend


def _liger_swiglu(api, c):
    from sam_fast.ops.llama import swiglu, swiglu_backend

    fn = api["swiglu"].apply
    backend = swiglu_backend(c["gate"].device, c["gate"].dtype)[0]
    return [c["gate"], c["up"]], lambda g, u: [swiglu(g, u)], lambda g, u: [fn(g, u)], backend


def _liger_rope(api, c):
    """Ours is Hugging Face's apply_rotary_pos_emb (not fused); q/k as LlamaAttention makes them,
    [1, heads, tokens, hd] views of the projections' [1, tokens, heads * hd]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def heads(t):
        return t.view(1, c["tokens"], c["heads"], c["head_dim"]).transpose(1, 2)

    return ([c["q"], c["k"]], lambda q, k: list(apply_rotary_pos_emb(heads(q), heads(k), c["cos"], c["sin"])),
            lambda q, k: list(api["rope"](heads(q), heads(k), c["cos"], c["sin"])), "transformers (unfused)")


def _liger_flce(api, c):
    """Ours is the chunked backend (the op itself would take Liger's where it is installed)."""
    from sam_fast.ops import linear_cross_entropy

    loss = api["fused_linear_cross_entropy"](ignore_index=-100, reduction="mean")

    def ours(h):
        with _backend("chunked"):
            return [linear_cross_entropy(h, c["lm_w"], c["targets"], checked_targets=True)]

    def liger(h):
        out = loss(c["lm_w"], h, c["targets"])
        out = getattr(out, "loss", out)  # a CrossEntropyOutput in releases that can return more
        return [(out[0] if isinstance(out, tuple) else out).float()]

    return [c["hidden"]], ours, liger, "chunked"


LIGER_OPS = {"rms_norm": _liger_rms_norm, "swiglu": _liger_swiglu, "rope": _liger_rope,
             "fused_linear_cross_entropy": _liger_flce}


def liger_row(ctx: WorkerCtx, inputs, ours, liger, timing) -> dict:
    """ms per forward + backward (input gradients) of ours and Liger's, Liger's time over ours, and
    whether outputs and input gradients agree within bf16 tolerance. The comparison runs on fresh
    copies (Liger's RoPE rotates its inputs in place); the timings reuse the inputs."""
    import torch

    warm, calls, rounds = timing
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in ours(*inputs)]

    def run(fn):
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        outs = fn(*xs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, xs, [g.clone() for g in grads]))

    diff = max_rel_diff(run(ours), run(liger))
    row = {"max_rel_diff": float(f"{diff:.3g}"), "agree": diff <= BF16_AGREE}
    for name, fn in (("ours", ours), ("liger", liger)):
        step = lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs, grads)  # noqa: E731
        row[f"{name}_ms"] = round(per_call_ms(step, ctx.device, calls, rounds, warm), 4)
    row["liger_vs_ours"] = round(row["liger_ms"] / row["ours_ms"], 2)
    return row


def _bench_liger(ctx: WorkerCtx) -> dict:
    """Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy beside ours at the
    LLaMA-7B shapes of the realistic B = 8 packed batch (bf16, forward + backward, frozen
    weights): `liger_row` per op; an op that fails costs its row. Skipped where liger_kernel
    cannot be imported."""
    import torch

    from sam_fast import SAMConfig
    from sam_fast.bench_plan import realistic_shapes

    api, version = liger_api()
    if ctx.dry:
        cfg, lengths, supervised = SAMConfig.tiny(), [9, 7, 8], 10
    else:
        cfg, shapes = SAMConfig.instructblip_vicuna7b(), realistic_shapes(0, 8)
        lengths = [s.llm_tokens(cfg.num_query_tokens) for s in shapes]
        supervised = sum(s.answer for s in shapes)
    c = liger_case(cfg.text_config, lengths, supervised, torch.bfloat16, ctx.device)
    res = {"liger_kernel": version, "rows": {},
           "shape": {k: c[k] for k in ("tokens", "D", "F", "heads", "head_dim", "V", "supervised")}}
    for op, pair in LIGER_OPS.items():
        if ctx.left() < (1 if ctx.dry else 10):
            res["rows"][op] = f"skipped: {max(ctx.left(), 0):.0f} s left of the item's time"
            continue
        try:
            inputs, ours, liger, backend = pair(api, c)
            res["rows"][op] = {"ours": backend, **liger_row(ctx, inputs, ours, liger, DECISION_TIMING[
                "dry" if ctx.dry else "gpu"])}
        except Exception as e:  # a Liger release whose API or kernels differ: this row only
            res["rows"][op] = _one_line(f"failed: {type(e).__name__}: {e}", 200)
        ctx.progress(res)
    rows = res["rows"].values()
    res["all_agree"] = all(isinstance(r, dict) and r["agree"] for r in rows)
    res["table"] = liger_table(res["rows"], version)
    return res


def liger_table(rows: dict, version) -> dict:
    cols = ["op", "ours (backend)", "ours ms", "liger ms", "liger / ours", "max rel diff", "agree"]
    keys = ["ours", "ours_ms", "liger_ms", "liger_vs_ours", "max_rel_diff", "agree"]
    body = [[op, *(r.get(k, "") for k in keys)] if isinstance(r, dict) else [op, r, *[""] * (len(keys) - 1)]
            for op, r in rows.items()]
    return {"title": f"Liger-Kernel {version} beside ours, bf16 fwd+bwd, ms per call", "columns": cols,
            "rows": body, "note": f"agree: max |liger - ours| <= {BF16_AGREE:g} x max |ours| (outputs, input grads)"}


# ----------------------------------------------------------------------------- main
def _parse_timeouts(text: str, ids: list[str]) -> dict[str, float]:
    """--timeouts 'PATTERN=S,...' -> {item id: seconds}; a pattern must match an item."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pattern, _, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ValueError(f"--timeouts {part[:80]!r}: expected ITEM=SECONDS with SECONDS > 0")
        hits = fnmatch.filter(ids, pattern)
        if not hits:
            raise ValueError(f"--timeouts {part[:80]!r}: no item matches {pattern[:80]!r}")
        out.update(dict.fromkeys(hits, seconds))
    return out


def _selected(items: list[Item], sections: list[str], patterns: list[str]) -> dict[str, str | None]:
    """item id -> why it is not selected (None: selected)."""
    out = {}
    for it in items:
        if it.section not in sections:
            out[it.id] = "not selected (--sections)"
        elif patterns and not any(fnmatch.fnmatchcase(it.id, p) for p in patterns):
            out[it.id] = "not selected (--items)"
        else:
            out[it.id] = None
    return out


def main(argv=None) -> int:
    """Run the items under the deadline, rewriting the report after each; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no build, pytest collects only")
    ap.add_argument("--no-build", action="store_true", help="skip the pip build (use what is installed)")
    ap.add_argument("--out", default=None,
                    help=f"report folder (default ${OUT_ENV}, else ${RETURN_ENV}, else bench/results)")
    ap.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                    help="seconds from start after which the report is written and the run exits 3 "
                         "(default %(default)s)")
    ap.add_argument("--inject-failure", action="store_true",
                    help="perturb the fast results of the correctness checks (tests the exit status; "
                         f"also {INJECT_FAILURE_ENV}=1)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--items", default="", help="comma-separated item ids or patterns (e.g. 'bench.*,check.encode.*')")
    ap.add_argument("--timeouts", default="", help="per-item timeouts, e.g. 'tests.pytest=120,bench.*=60'")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--exec-child"]:  # --exec-child PARENT_PID -- CMD...: CMD, killed when PARENT dies
        _die_with_parent(int(argv[1]))
        os.execv(argv[3], argv[3:])
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not args.deadline > 0:
        ap.error(f"--deadline must be > 0 seconds, got {args.deadline}")
    dry = args.dry_run
    items = plan(dry, args.no_build)
    ids = [it.id for it in items]
    patterns = [p.strip() for p in args.items.split(",") if p.strip()]
    for p in patterns:
        if not fnmatch.filter(ids, p):
            ap.error(f"--items: {p[:80]!r} matches no item; items: {', '.join(ids)}")
    try:
        timeouts = {it.id: it.timeout for it in items} | _parse_timeouts(args.timeouts, ids)
        faults = injections(os.environ)
    except ValueError as e:
        ap.error(str(e))
    probe = None if dry else _cuda_probe()
    env = _env_info(probe)
    folder = out_dir(args.out, os.environ)
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", env["device"]) + ("-dry" if dry else "")
    stem = _free_stem(folder, f"gpu_check-{slug}-{env['date'][:10]}")
    run = Run(items, env=env, dry=dry, faults=faults, inject_failure=inject_failure(args.inject_failure, os.environ),
              deadline=args.deadline, stem=stem, timeouts=timeouts)
    if probe is not None and not probe["available"]:
        return _no_device(run, probe.get("error") or "torch sees no CUDA device")
    _say(f"gpu_check: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
         f"transformers {env['transformers']} | commit {env['commit']} | {'dry run' if dry else 'GPU run'} | "
         f"deadline {args.deadline:.0f} s | report {stem}.json")
    selected = _selected(items, wanted, patterns)
    for it in items:  # what will not run is known now; the not selected are counted, not listed
        if selected[it.id]:
            run.entries[it.id].update(status="skipped", reason=selected[it.id])
        elif it.skip:
            run.finish(it.id, "skipped", reason=it.skip)
    run.write()
    unselected = sum(1 for why in selected.values() if why)
    if unselected:
        _say(f"gpu_check: {unselected} of {len(items)} items not selected (--sections/--items)")
    return _run_all(run, items)


def _no_device(run: Run, why: str) -> int:
    """Nothing can run: say so in the report too (on a lent machine it is all that comes back)."""
    for e in run.entries.values():
        e.update(status="skipped", reason=f"no usable CUDA device: {why}")
    run.status, run.exit_code, run.error = "failed", EXIT_USAGE, f"no usable CUDA device: {why}"
    run.write()
    shutil.rmtree(run.tmp, ignore_errors=True)
    _say(f"gpu_check: no usable CUDA device ({why}); run with --dry-run for the CPU mode; report {run.stem}.json",
         file=sys.stderr)
    return EXIT_USAGE


def _run_all(run: Run, items: list[Item]) -> int:
    import faulthandler

    threading.Thread(target=_watchdog, args=(run,), daemon=True, name="gpu_check-deadline").start()
    # the last resort if the watchdog cannot run (a C call holding the GIL): stacks, then exit
    faulthandler.dump_traceback_later(max(run.left(), 0) + 20, exit=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: run.end(signal.Signals(signum).name, 128 + signum))
    todo = [it for it in items if run.entries[it.id]["status"] == "pending"]
    i = 0
    while i < len(todo):
        it = todo[i]
        if it.worker is None:
            if it.estimate > run.left():
                run.finish(it.id, "skipped", reason=f"needs ~{it.estimate:.0f} s, {max(run.left(), 0):.0f} s left "
                                                    f"before the deadline")
            else:
                _run_inline(run, it)
            i += 1
            continue
        group = [it.id]  # consecutive items of one worker group share a process
        while i + len(group) < len(todo) and todo[i + len(group)].worker == it.worker:
            group.append(todo[i + len(group)].id)
        _run_workers(run, group)
        i += len(group)
    faulthandler.cancel_dump_traceback_later()
    with run.lock:
        if run.finished:
            return run.exit_code
        bad = [e for e in run.entries.values() if e["status"] in ("failed", "timeout")]
        run.status, run.exit_code = ("failed", EXIT_FAILED) if bad else ("passed", EXIT_OK)
        run.write()
        run.finished = True
    shutil.rmtree(run.tmp, ignore_errors=True)
    _say(f"gpu_check: {'PASS' if not bad else 'FAIL'} in {time.monotonic() - T0:.0f} s "
         f"({len(bad)} failed or timed out); report {run.stem}.json and .md")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
