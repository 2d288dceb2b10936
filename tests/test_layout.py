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
    from sam_fast.ops import dispatch

    assert dispatch.usable_table({"a": None, "b": "no"}) == {"a": "usable", "b": "no"}


def _op_definitions() -> dict[str, list[str]]:
    """Function name -> the sam_fast/ops files defining it (module level or nested)."""
    defs: dict[str, list[str]] = {}
    for p in sorted(OPS.glob("*.py")):
        for n in ast.walk(_tree(p)):
            if isinstance(n, ast.FunctionDef):
                defs.setdefault(n.name, []).append(p.name)
    return defs


def test_each_backend_rule_has_one_home():
    """The forced backend and the "usable" table live in the dispatcher; the Triton probe and the
    interpreter rule in _common; every op with a Triton backend asks them (no second probe, no
    find_spec, no interpreter rule of its own)."""
    defs = _op_definitions()
    assert defs.get("usable_table") == ["dispatch.py"] and defs.get("forced_backend") == ["dispatch.py"], defs
    assert defs.get("triton_import_error") == ["_common.py"], defs.get("triton_import_error")
    for p in sorted(OPS.glob("*.py")):
        text = p.read_text()
        assert 'find_spec("triton")' not in text, f"{p.name} detects Triton with find_spec"
        if p.name != "_common.py":
            assert "import triton\n" not in text, f"{p.name} probes Triton itself"
        if 'register("triton"' in text:
            assert "triton_device_reason(" in text and "triton_import_error(" in text, \
                f"{p.name} has a Triton backend that does not use _common's probe and interpreter rule"


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


def _imports(path: Path) -> set[str]:
    """Every sam_fast module `path` imports, at module level or inside functions."""
    out = set()
    for n in ast.walk(_tree(path)):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("sam_fast")}
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("sam_fast") and not n.level:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}  # `from sam_fast.models import loading`
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _on_circles(graph: dict[str, set[str]]) -> list[str]:
    """The nodes of `graph` (node -> the nodes it imports) that can reach themselves."""
    def reach(start, seen):
        for nxt in graph[start]:
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    return sorted(n for n in graph if n in reach(n, set()))


def test_models_package_has_no_import_circle():
    """No import cycle among the modules of sam_fast/models (sam_fast/models/loading/ included), counting
    imports inside functions (the old loading.py <-> sam.py circle was hidden behind function-level imports)."""
    mods = {_module_name(p): p for p in (PKG / "models").rglob("*.py") if p != PKG / "models" / "__init__.py"}
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    circles = _on_circles(graph)
    assert not circles, f"import circle through {circles}: {graph}"


@pytest.mark.parametrize("module", ["sam_fast.models.loading", "sam_fast.models.loading.lavis",
                                    "sam_fast.models.loading.hf", "sam_fast.models.sam", "sam_fast.models.directory",
                                    "sam_fast.models.checkpoint_files"])
def test_model_modules_import_first(module):
    r = _run(f"import {module}")
    assert r.returncode == 0, r.stderr[-2000:]


def test_inference_imports_do_not_import_the_trainer():
    """generate / eval / explain (and `import sam_fast`) load models without importing the trainer."""
    code = (
        "import sys\n"
        "import sam_fast, sam_fast.cli, sam_fast.eval, sam_fast.eval.explain, sam_fast.distributed\n"
        "from sam_fast.models.directory import load_model_dir, prompt_builder, build_builtin\n"
        "from sam_fast.train.outputs import load_model_dir as old_path\n"
        "assert old_path is load_model_dir\n"
        "print(sorted(m for m in sys.modules if m.startswith('sam_fast.train.trainer')))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"the trainer was imported: {r.stdout}"


def test_generate_command_does_not_import_the_trainer(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from sam_fast.cli import main\n"
        "from sam_fast.models.directory import build_builtin, builtin_tokenizers\n"
        "from sam_fast.data import save_tokenizers\n"
        f"d = {str(tmp_path / 'm')!r}\n"
        "build_builtin('tiny').save_pretrained(d)\n"
        "save_tokenizers(*builtin_tokenizers('tiny'), d)\n"
        f"main(['generate', '--model', d, '--images', {str(tmp_path / 'a.png')!r}, '--prompt', 'what?', "
        "'--max-new-tokens', '2', '--num-beams', '1'])\n"
        "print('trainer imported:', 'sam_fast.train.trainer' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainer imported: False" in r.stdout, r.stdout


def test_trainable_modules_defined_once():
    """The tuple is written once, in the loaders' shared module (below the model, so loading needs no import
    of sam_fast.models.sam); the model exposes it as `SAM.TRAINABLE_MODULES`, and every old import path gives
    the same object."""
    where = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
             for n in ast.walk(_tree(p)) if isinstance(n, ast.Assign) and not isinstance(n.value, ast.Name)
             for t in n.targets if isinstance(t, ast.Name) and t.id == "TRAINABLE_MODULES"]
    assert where == ["sam_fast/models/loading/common.py"], where
    from sam_fast.models import SAM, TRAINABLE_MODULES, loading, sam
    from sam_fast.train import trainer

    assert SAM.TRAINABLE_MODULES is TRAINABLE_MODULES and "TRAINABLE_MODULES" in vars(SAM)
    assert trainer.TRAINABLE_MODULES is loading.TRAINABLE_MODULES is sam.TRAINABLE_MODULES is TRAINABLE_MODULES
    assert TRAINABLE_MODULES == ("adaptive_adjustment", "guidance_in", "guidance_out", "language_projection")


# _kernels/data/runlock -> ops -> modules -> models -> eval -> train/synthesis -> cli: a module imports its own
# layer and earlier ones only (modules of the same layer side by side: neither imports the other; the ground
# floor's _kernels, data and runlock import nothing of each other).
# synthesis is an application above eval: its captioner runs sam_fast.eval.answer; so is train: its
# evaluations during training (eval_every) generate and score as sam_fast.eval does.
LAYERS = {"sam_fast._kernels": 0, "sam_fast.data": 0, "sam_fast.runlock": 0, "sam_fast.ops": 1, "sam_fast.modules": 2,
          "sam_fast.models": 3, "sam_fast.eval": 4, "sam_fast.train": 5, "sam_fast.synthesis": 5, "sam_fast.cli": 6}
# deprecated alias module -> the package it re-exports (its only import, wherever that package sits)
ALIASES = {"sam_fast.data.synthesis": "sam_fast.synthesis"}


def _layer(module: str) -> str | None:
    """The layer (a key of LAYERS) `module` belongs to, or None for modules outside the chain."""
    return next((k for k in LAYERS if module == k or module.startswith(k + ".")), None)


def _layer_files(layer: str) -> list[tuple[str, Path]]:
    """(module name, file) of every module of `layer`, deprecated aliases left out (`ALIASES`)."""
    base = PKG / layer.split(".")[1]
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    return [(_module_name(p), p) for p in files if p.is_file() and _module_name(p) not in ALIASES]


def _back_edges(layer: str) -> dict[str, list[str]]:
    """module of `layer` -> the modules it imports from its own-numbered or a later layer (other than its own)."""
    bad = {}
    for name, p in _layer_files(layer):
        hits = sorted(i for i in _imports(p) if _layer(i) not in (None, layer) and LAYERS[_layer(i)] >= LAYERS[layer])
        if hits:
            bad[name] = hits
    return bad


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_import_only_earlier_layers(layer):
    """No back-edge along _kernels/data/runlock -> ops -> modules -> models -> eval -> train/synthesis -> cli,
    counting imports inside functions; in particular sam_fast.models.* never imports sam_fast.train.* (loading
    a model directory reads checkpoints through sam_fast.models.checkpoint_files) and sam_fast.data.* never
    imports a model, the evaluator or the trainer."""
    assert _layer_files(layer), f"no modules found for layer {layer}"
    bad = _back_edges(layer)
    assert not bad, f"imports of a later (or sibling) layer: {bad}"


def test_aliases_import_only_their_target():
    """A deprecated alias module (`ALIASES`) imports the package it stands for and nothing else of sam_fast."""
    for alias, target in ALIASES.items():
        path = PKG.joinpath(*alias.split(".")[1:]).with_suffix(".py")
        assert path.is_file(), f"{alias}: no module {path.relative_to(ROOT)}"
        other = sorted(i for i in _imports(path) if i != target and not i.startswith(target + "."))
        assert not other, f"{alias}: imports {other} besides {target}"


def test_layer_graph_has_no_circle():
    """The layers' import graph (an edge when any module of one imports a module of another) is acyclic."""
    graph = {layer: {_layer(i) for _, p in _layer_files(layer) for i in _imports(p)} - {None, layer}
             for layer in LAYERS}
    circles = _on_circles(graph)
    assert not circles, f"import circle through {circles}: {graph}"


def test_lower_layers_load_no_later_layer():
    """Importing every module of data, runlock, ops, modules and models (and all they import in turn, through
    any package) loads nothing of sam_fast.train, sam_fast.eval, sam_fast.synthesis or sam_fast.cli."""
    names = [n for layer in ("sam_fast.data", "sam_fast.runlock", "sam_fast.ops", "sam_fast.modules",
                             "sam_fast.models") for n, _ in _layer_files(layer)]
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n"
            "    importlib.import_module(n)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['sam_fast', 'train'], ['sam_fast', 'eval'], "
            "['sam_fast', 'synthesis'], ['sam_fast', 'cli'])))\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"a later layer was loaded: {r.stdout}"


def test_checkpoint_names_still_importable_from_train():
    """The checkpoint file format moved to sam_fast.models.checkpoint_files; sam_fast.train.checkpoint
    (and sam_fast.train) give the same objects under the old names."""
    import sam_fast.train
    from sam_fast.models import checkpoint_files as files
    from sam_fast.train import checkpoint as ckpt

    for name in ("CheckpointError", "LegacyCheckpointError", "TRAINABLE_FILE", "STATE_FILE", "STATE_TENSORS_FILE",
                 "LEGACY_STATE_FILE", "is_checkpoint_dir", "is_legacy", "step_dirs", "latest_checkpoint",
                 "load_trainable", "load_trainable_into"):
        assert getattr(ckpt, name) is getattr(files, name), name
    assert sam_fast.train.CheckpointError is files.CheckpointError
    assert sam_fast.train.latest_checkpoint is files.latest_checkpoint
    assert ckpt.load_latest.__defaults__[0] is ckpt.load_checkpoint  # resume state read by default, as before


def test_run_lock_names_still_importable_from_train():
    """The run lock moved down to sam_fast.runlock (shared by training and synthesis runs);
    sam_fast.train.outputs gives the same objects under the old names."""
    from sam_fast import runlock
    from sam_fast.train import outputs

    for name in ("RunLock", "RunLockedError", "LOCK_FILE"):
        assert getattr(outputs, name) is getattr(runlock, name), name
    assert not _imports(PKG / "runlock.py"), "sam_fast.runlock imports sam_fast modules"


def test_kernels_are_documented_and_not_a_top_level_package():
    """sam_fast/_kernels/__init__.py names, for every kernel file, the op module that launches it;
    README's tree shows them. No top-level kernels/ folder: with the checkout on sys.path it shadowed
    the `kernels` package transformers >= 5.25 imports (ImportError inside transformers)."""
    assert not (ROOT / "kernels" / "__init__.py").is_file(), "a top-level kernels/ package shadows transformers' import"
    doc = ast.get_docstring(_tree(PKG / "_kernels" / "__init__.py"))
    assert "sam_fast._kernels" in doc
    launched = {}
    for p in OPS.glob("*.py"):
        for i in _imports(p):
            if i.startswith("sam_fast._kernels."):
                launched.setdefault(i.split(".")[2], set()).add(_module_name(p))
    files = sorted(p.stem for p in (PKG / "_kernels").glob("*.py") if p.name != "__init__.py")
    assert files and set(launched) <= set(files)
    for stem in files:
        assert f"{stem}.py" in doc, f"_kernels/{stem}.py is not described in _kernels/__init__.py"
        for op in launched.get(stem, ()):
            assert op in doc, f"_kernels/{stem}.py is launched by {op}, which _kernels/__init__.py does not name"
    readme = (ROOT / "README.md").read_text()
    assert "sam_fast/_kernels/" in readme and "sam_fast._kernels" in readme


def test_tests_mirror_the_package():
    """tests/ mirrors sam_fast/: no test module imports another test module (shared pieces live in
    underscore helper modules such as _sam_helpers or in conftest fixtures), also not in the code of
    a subprocess it runs; and every op module of sam_fast/ops (one that registers backends with the
    dispatcher) has tests/ops/test_<op>.py and bench/ops/bench_<op>.py."""
    import re

    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    in_code = re.compile(r"^\s*(?:from|import)\s+(test_\w+)", re.MULTILINE)
    bad = {}
    for p in sorted(tests.rglob("test_*.py")):
        hits = set()
        for n in ast.walk(_tree(p)):
            if isinstance(n, ast.Import):
                hits |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                hits.add(n.module.split(".")[0])
            elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                hits |= set(in_code.findall(n.value))
            elif isinstance(n, ast.Call) and ast.unparse(n.func).endswith("import_module") and n.args \
                    and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
                hits.add(n.args[0].value.split(".")[0])
        hits = sorted(h for h in hits if h.startswith("test_") and h != p.stem)
        if hits:
            bad[str(p.relative_to(ROOT))] = hits
    dupes = sorted(n for n in names if len(list(tests.rglob(f"{n}.py"))) > 1)

    ops = sorted(p.stem for p in OPS.glob("*.py") if not p.name.startswith("_")
                 and any(isinstance(n, ast.Call) and ast.unparse(n.func) == "dispatcher" and n.args
                         and isinstance(n.args[0], ast.Constant) for n in ast.walk(_tree(p))))
    assert {"context_reweight", "cross_attention", "linear_cross_entropy", "llama"} <= set(ops), ops
    missing = [f for op in ops for f in (f"tests/ops/test_{op}.py", f"bench/ops/bench_{op}.py")
               if not (ROOT / f).is_file()]
    assert not (bad or dupes or missing), (f"test modules importing other test modules: {bad}; test module "
                                           f"basenames used twice: {dupes}; ops without their test / bench file: "
                                           f"{missing}")


# files of sam_fast that may still spell the context modes out (none)
CONTEXT_MODE_TUPLES_ALLOWED: set[str] = set()


def test_context_modes_are_declared_once():
    """("leave_one_out", "shared") is written once, as sam_fast.config.CONTEXT_MODES; the op, the
    CLI's choices and ``sam-fast env`` use that constant."""
    hits = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        for n in ast.walk(_tree(p)):
            if isinstance(n, (ast.Tuple, ast.List)) and len(n.elts) == 2 and all(
                    isinstance(e, ast.Constant) for e in n.elts) and {e.value for e in n.elts} == {"leave_one_out",
                                                                                                  "shared"}:
                hits.append(f"{rel}:{n.lineno}")
    hits = [h for h in hits if h.split(":")[0] not in CONTEXT_MODE_TUPLES_ALLOWED]
    assert [h.split(":")[0] for h in hits] == ["config.py"], hits


def test_attention_kernels_share_one_prologue():
    """The three attention kernels of sam_fast/_kernels/cross_attention.py start with one shared
    @triton.jit prologue (`_attn_program`), as the other kernel files share _kernels/_common.py's."""
    tree = _tree(PKG / "_kernels" / "cross_attention.py")
    kernels = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("attn_")]
    assert len(kernels) == 3
    for k in kernels:
        calls = {ast.unparse(c.func) for c in ast.walk(k) if isinstance(c, ast.Call)}
        assert "_attn_program" in calls and "tl.program_id" not in calls and "_kv_base" not in calls, k.name


# Long functions hide their steps. The CLI's parser builders and the analytic FLOP table are lists,
# not logic; files another change is rewriting may still hold long ones (split them there).
LONG_FUNCTION_EXEMPT = {"cli.py", "bench_plan.py"}
LONG_FUNCTIONS_ALLOWED = {"models/sam.py:forward", "models/sam.py:generate"}
MAX_FUNCTION_LINES = 60


def _long_functions() -> list[str]:
    """"file:function (N lines)" for every function of sam_fast/ longer than MAX_FUNCTION_LINES
    (def line to last line, docstring included), nested ones too."""
    out = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if rel in LONG_FUNCTION_EXEMPT:
            continue
        for n in ast.walk(_tree(p)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{n.name} ({lines} lines)")
    return out


def test_functions_are_short():
    long = [f for f in _long_functions() if f.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_long_function_allow_list_is_current():
    still = {f.split(" (")[0] for f in _long_functions()}
    assert LONG_FUNCTIONS_ALLOWED <= still, f"{sorted(LONG_FUNCTIONS_ALLOWED - still)} are short now: unlist them"
