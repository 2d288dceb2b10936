"""Run the CUDA kernels of csrc/*.cu on the CPU, for tests on machines without a GPU.

The source is compiled by the host C++ compiler against shim CUDA headers (`SHIM`): every CUDA
thread of a block is an OS thread, ``__syncthreads`` a ``std::barrier`` of the block's threads,
``__shfl_xor_sync`` an exchange through a block-wide buffer between two barriers, ``__shared__``
memory a ``static`` (blocks run one after another), and each ``kernel<<<grid, block, ...>>>(args)``
launch is rewritten into a call of `emu::launch` (`cuda_to_cpp`). So a missing barrier, a read of
another thread's value, a wrong index or a wrong formula shows up as a wrong result, as on a GPU;
only float32 is meaningful (the shim's half types are plain floats). Device pointers are host
pointers: the C ABI of the kernels (csrc/context_reweight_cuda.h) is called with CPU tensors
through ctypes.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

SHIM = r"""
#ifndef SAM_FAST_EMU_SHIM
#define SAM_FAST_EMU_SHIM
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 { unsigned x, y, z; };
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

namespace emu {
inline thread_local emu_uint3 thread_idx, block_idx;
inline std::barrier<>* block_barrier = nullptr;
inline float exchange[1024];

template <class Body>
void launch(dim3 grid, unsigned threads, Body body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        block_barrier = &bar;
        std::vector<std::thread> team;
        for (unsigned t = 0; t < threads; ++t)
          team.emplace_back([&, t] {
            thread_idx = {t, 0, 0};
            block_idx = {x, y, z};
            body();
            bar.arrive_and_drop();  // an exited thread no longer holds the others' barriers
          });
        for (auto& th : team) th.join();
      }
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__ static
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  emu::exchange[t] = v;
  __syncthreads();
  const float other = emu::exchange[t ^ static_cast<unsigned>(lane_mask)];
  __syncthreads();
  return other;
}
struct __half { float v; };
struct __nv_bfloat16 { float v; };
inline float __half2float(__half h) { return h.v; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.v; }
inline __half __float2half_rn(float f) { return {f}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }
#endif
"""

_LAUNCH = re.compile(r"(\w+<[^<>;]*>|\w+)<<<(.*?)>>>\(", re.S)


def cuda_to_cpp(source: str) -> str:
    """`source` with every ``kernel<<<grid, block, smem, stream>>>(args);`` replaced by
    ``emu::launch(dim3(grid), block, [=] { kernel(args); });``."""
    out, pos = [], 0
    for m in _LAUNCH.finditer(source):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:  # the launch's argument list, up to its closing parenthesis
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        grid, block = [p.strip() for p in _split_top(m.group(2))][:2]
        args = source[m.end() : i - 1]
        out.append(source[pos : m.start()])
        out.append(f"emu::launch(dim3({grid}), {block}, [=] {{ {m.group(1)}({args}); }})")
        pos = i
    out.append(source[pos:])
    return "".join(out)


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside parentheses and angle brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "<": 1, ")": -1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def build(cu_file: Path, include: Path, out_dir: Path) -> ctypes.CDLL | None:
    """Compile `cu_file` for the CPU emulation into a shared library in `out_dir` and load it;
    None when there is no C++20 compiler."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return None
    shim = out_dir / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        (shim / name).write_text(SHIM)
    src = out_dir / (cu_file.stem + "_emu.cpp")
    src.write_text(cuda_to_cpp(cu_file.read_text()))
    lib = out_dir / (cu_file.stem + "_emu.so")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{shim}", f"-I{include}", str(src),
           "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))
