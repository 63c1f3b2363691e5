// Module init and operator registration of the lpips_fast extension (schemas: schemas.h;
// kernels: cpu/*.cpp, cuda/*.cu; fake kernels: lpips_fast/_ops.py, lpips_fast/_conv_ops.py;
// autograd: the head's in lpips_fast/_ops.py, the conv ops' in conv_autograd.cpp).
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// `import lpips_fast._C` loads this library (and with it the TORCH_LIBRARY registrations);
// the module itself is empty: the ops live in torch.ops.lpips_fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lpips_fast kernels (ops in torch.ops.lpips_fast)", -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lpips_fast, m) { lpips_fast::define_schemas(m); }
