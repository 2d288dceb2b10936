// The Python module sam_fast._C. Importing it loads this shared library, whose static
// initialisers register the sam_fast::* ops with the torch dispatcher; the module itself only
// says how it was built. Plain CPython API, so this file compiles in a second.
#include <Python.h>

#ifndef SAM_FAST_TORCH_VERSION
#error "setup.py defines SAM_FAST_TORCH_VERSION (torch.__version__ at build time)"
#endif
#ifndef SAM_FAST_WITH_CUDA
#define SAM_FAST_WITH_CUDA 0
#endif
#define SAM_FAST_STR2(x) #x
#define SAM_FAST_STR(x) SAM_FAST_STR2(x)

// sam_fast._ext reads this tag from the file before loading it, so a library built against
// another torch is refused instead of being loaded into a process with a mismatched libtorch.
extern "C" __attribute__((used, visibility("default"))) const char sam_fast_build_tag[] =
    "sam_fast-build-tag{torch=" SAM_FAST_TORCH_VERSION
    ";with_cuda=" SAM_FAST_STR(SAM_FAST_WITH_CUDA) "}";

static PyModuleDef sam_fast_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled ops of sam_fast (registered as torch.ops.sam_fast.*) and their build info.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&sam_fast_module);
  if (m == nullptr) return nullptr;
  PyObject* with_cuda = PyBool_FromLong(SAM_FAST_WITH_CUDA);
  if (PyModule_AddStringConstant(m, "built_with_torch", SAM_FAST_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "build_tag", sam_fast_build_tag) < 0 ||
      PyModule_AddObject(m, "with_cuda", with_cuda) < 0) {
    Py_XDECREF(with_cuda);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
