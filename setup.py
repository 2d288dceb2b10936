"""Build of sam_fast: the Python packages plus one compiled extension, ``sam_fast._C``.

    pip install --no-build-isolation -e .                      # CPU op (+ CUDA op with a CUDA torch)
    SAM_FAST_BUILD_EXT=0 pip install --no-build-isolation -e .  # pure Python, no compiler needed

The extension holds the CPU sources of csrc/ always, and csrc/*.cu plus their torch binding only
when the installed torch was built with CUDA and a CUDA toolkit is found (CUDA_HOME). A CUDA
extension cannot be built against a CPU torch, so on machines without one the .cu files are only
compile-checked by the tests (plain nvcc). The build records torch.__version__ in the binary;
`sam_fast._ext` refuses to load it under any other torch (and warns once when it does).

The binary runs only under the torch it was compiled against, so:

- a wheel with the extension requires exactly that torch (``torch==<build version>``); a pure-Python
  build (SAM_FAST_BUILD_EXT=0) and the sdist require ``torch>=2.4``;
- a generated source records where that torch was and whether it sat in an isolated build
  environment (pip's, ``python -m build``'s, uv's), which the loader names when it refuses the binary;
- a build in pip's isolated environment whose downloaded torch differs from the torch installed
  where sam_fast is being installed stops with the command to type (``pip install
  --no-build-isolation .``) instead of producing a binary that would be refused;
- ``sdist`` needs no torch: it only packs the sources (MANIFEST.in lists csrc/, ...).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_MIN = "torch>=2.4"
DEPENDENCIES = [  # besides torch, whose requirement depends on the build (see _torch_requirement)
    "transformers>=5.17,<6",
    "safetensors",
    "numpy",
    "pillow",
    "tqdm",
    "tokenizers",
    "pyyaml",
    "pycocoevalcap",
    "rouge",
]
FIX = "pip install --no-build-isolation ."
# Relative to ROOT (setuptools builds from there); ignored by git, left out of the sdist.
GENERATED_SOURCE = "build/generated/sam_fast_build_env.cpp"
CPU_SOURCES = [
    "csrc/context_reweight.cpp",
    "csrc/context_reweight_cpu.cpp",
    "csrc/python_module.cpp",
]
CUDA_BINDINGS = ["csrc/context_reweight_cuda_binding.cpp"]
CUDA_ARCHS = ("80", "90")  # A100, H100/H200


def _want_extension() -> bool:
    flag = os.environ.get("SAM_FAST_BUILD_EXT", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


def _sdist_only() -> bool:
    """True when setup.py only packs the sources (``sdist``, or the build backend's sdist hooks,
    which run setup.py as ``egg_info``): no torch needed, nothing compiled."""
    return "sdist" in sys.argv[1:] or os.environ.get("SAM_FAST_PACKING_SDIST") == "1"


def _isolation(torch_dir: str) -> str:
    """The kind of isolated build environment `torch_dir` lies in ("pip", "build", "uv"), or ""."""
    p = torch_dir.replace(os.sep, "/")
    if "/pip-build-env-" in p:
        return "pip"
    if "/build-env-" in p:
        return "build"  # python -m build
    if "/builds-v" in p:
        return "uv"
    return ""


def _torch_installed_outside() -> str | None:
    """The torch version installed in the environment pip is installing into, seen from inside pip's
    isolated build environment (pip hides it through PYTHONPATH/PYTHONNOUSERSITE); None if none."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    code = (
        "import importlib.metadata as m\n"
        "try:\n    print(m.version('torch'))\n"
        "except m.PackageNotFoundError:\n    pass\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def _check_isolated_build(torch_version: str, isolated: str) -> None:
    """Stop a pip-isolated build whose torch differs from the installed one: its binary would be
    refused at import. Other kinds of isolation hide nothing we can ask (their python is a venv)."""
    if isolated != "pip":
        return
    installed = _torch_installed_outside()
    if installed is None or installed == torch_version:
        return
    sys.exit(
        f"sam_fast: pip's isolated build environment downloaded torch {torch_version} to compile "
        f"sam_fast._C against, but torch {installed} is installed for {sys.executable}; the compiled "
        f"extension would be refused there. Build against the installed torch instead:\n    {FIX}\n"
        "(SAM_FAST_BUILD_EXT=0 pip install --no-build-isolation . gives a pure-Python install.)"
    )


def _c_string(text: str) -> str:
    """`text` safe inside a C string literal and the build tag (no quotes, backslashes, ';', '}')."""
    return re.sub(r"[^A-Za-z0-9_.+\-/:~ ]", "_", text)


def _write_build_env_source(torch_version: str, isolated: str, torch_dir: str) -> str:
    """A C++ source holding the build-environment tag that sam_fast._ext reads before loading the
    library; rewritten only when its content changes (no needless recompiles)."""
    tag = f"sam_fast-build-env{{torch={_c_string(torch_version)};isolated={isolated};torch_dir={_c_string(torch_dir)}}}"
    text = (
        "// Generated by setup.py: how this build of sam_fast._C was made (read by sam_fast._ext).\n"
        'extern "C" __attribute__((used, visibility("default"))) const char sam_fast_build_env[] =\n'
        f'    "{tag}";\n'
    )
    path = os.path.join(ROOT, GENERATED_SOURCE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return GENERATED_SOURCE
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return GENERATED_SOURCE


def _torch_requirement(torch_version: str | None) -> str:
    """``torch==<public build version>`` for a wheel with the extension, else ``torch>=2.4``. The
    local label (+cpu, +cu128) is left out: indexes differ in which they carry; the loader compares
    the full version."""
    return f"torch=={torch_version.split('+')[0]}" if torch_version else TORCH_MIN


def _extensions():
    """([extension], cmdclass, torch version built against), or ([], {}, None) without one."""
    if _sdist_only():
        return [], {}, None
    if not _want_extension():
        print("sam_fast: SAM_FAST_BUILD_EXT=0, building no extension (pure-Python install)")
        for stale in glob.glob(os.path.join(ROOT, "sam_fast", "_C.*")):  # left by an earlier editable build
            print(f"sam_fast: removing {stale}")
            os.remove(stale)
        return [], {}, None

    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        sys.exit(
            f"sam_fast: building sam_fast._C needs torch in the build environment ({exc}). Install torch "
            f"first, then:\n    {FIX}\n(SAM_FAST_BUILD_EXT=0 builds a pure-Python sam_fast without it.)"
        )

    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    isolated = _isolation(torch_dir)
    if isolated:
        print(f"sam_fast: building against torch {torch.__version__} of an isolated build environment "
              f"({isolated}: {torch_dir}); the extension loads only under that exact torch")
    _check_isolated_build(torch.__version__, isolated)

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = bool(torch.version.cuda) and cuda_home is not None
    if with_cuda:
        why = f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}"
    elif torch.version.cuda:
        why = f"torch has CUDA {torch.version.cuda} but no CUDA toolkit was found (set CUDA_HOME)"
    else:
        why = f"torch {torch.__version__} is a CPU build"
    print(f"sam_fast: building sam_fast._C with{'' if with_cuda else 'out'} CUDA ({why})")

    define_macros = [
        ("SAM_FAST_TORCH_VERSION", f'"{torch.__version__}"'),
        ("SAM_FAST_WITH_CUDA", "1" if with_cuda else "0"),
    ]
    cxx_flags = ["-O3"]
    sources = list(CPU_SOURCES) + [_write_build_env_source(torch.__version__, isolated, torch_dir)]
    if with_cuda:
        sources += CUDA_BINDINGS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/csrc/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # else torch picks the arches from it
            nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
            nvcc_flags += [f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
        ext = cpp_extension.CUDAExtension(
            "sam_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = cpp_extension.CppExtension(
            "sam_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}, torch.__version__


ext_modules, cmdclass, built_with_torch = _extensions()

setup(
    packages=find_packages(include=["sam_fast", "sam_fast.*"]),
    package_data={"sam_fast": ["py.typed"], "sam_fast.synthesis": ["prompts.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[_torch_requirement(built_with_torch), *DEPENDENCIES],
    zip_safe=False,
)
