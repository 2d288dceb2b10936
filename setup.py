"""Build of sam_fast: the Python packages plus one compiled extension, ``sam_fast._C``.

    pip install --no-build-isolation -e .                      # CPU op (+ CUDA op with a CUDA torch)
    SAM_FAST_BUILD_EXT=0 pip install --no-build-isolation -e .  # pure Python, no compiler needed

The extension holds the CPU sources of csrc/ always, and csrc/*.cu plus their torch binding only
when the installed torch was built with CUDA and a CUDA toolkit is found (CUDA_HOME). A CUDA
extension cannot be built against a CPU torch, so on machines without one the .cu files are only
compile-checked by the tests (plain nvcc). The build records torch.__version__ in the binary;
`sam_fast._ext` refuses to load it under any other torch.
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
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


def _extensions():
    """([extension], cmdclass), or ([], {}) for a pure-Python install."""
    if not _want_extension():
        print("sam_fast: SAM_FAST_BUILD_EXT=0, building no extension (pure-Python install)")
        for stale in glob.glob(os.path.join(ROOT, "sam_fast", "_C.*")):  # left by an earlier editable build
            print(f"sam_fast: removing {stale}")
            os.remove(stale)
        return [], {}

    import torch
    from torch.utils import cpp_extension

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
    sources = list(CPU_SOURCES)
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
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sam_fast", "sam_fast.*"]) + ["sam_fast._kernels"],
    package_dir={"sam_fast._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
