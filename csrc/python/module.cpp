// The Python module tokred_ext._C. It holds no functions: loading it runs the static op
// registrations, after which the ops are reachable as torch.ops.tokred.*.
#include <Python.h>

static struct PyModuleDef tokred_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "tokred kernels (registered as torch.ops.tokred.*)", -1,
                                           nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tokred_module); }
