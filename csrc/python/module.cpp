// The Python module tokred_ext._C. Loading it runs the static op registrations, after which the
// ops are reachable as torch.ops.tokred.*. Its functions report how the CPU kernels run.
#include <ATen/Parallel.h>
#include <Python.h>

#include <atomic>

#include "cpu/fma.h"

// The number of distinct threads at::parallel_for ran a large loop on, as seen from this library.
// at::parallel_for is a header template, so it runs on one thread in any library compiled without
// the OpenMP flag that torch was built with, whatever torch.get_num_threads() says.
static PyObject* parallel_threads(PyObject*, PyObject*) {
  constexpr int kMaxThreads = 1024;
  std::atomic<bool> seen[kMaxThreads] = {};
  const int64_t work = int64_t(at::get_num_threads()) * 64;
  at::parallel_for(0, work, 1, [&](int64_t, int64_t) {  // the workers never touch Python
    const int t = at::get_thread_num();
    if (t >= 0 && t < kMaxThreads) seen[t] = true;
  });
  long used = 0;
  for (const auto& s : seen) used += s ? 1 : 0;
  return PyLong_FromLong(used);
}

// Whether the CPU kernels with a fused multiply-add variant (routing's) run it (cpu/fma.h).
static PyObject* cpu_fused_multiply_add(PyObject*, PyObject*) {
  return PyBool_FromLong(tokred::fused_multiply_add() ? 1 : 0);
}

static PyMethodDef tokred_methods[] = {
    {"_parallel_threads", parallel_threads, METH_NOARGS,
     "Threads at::parallel_for uses in tokred's CPU kernels."},
    {"_cpu_fused_multiply_add", cpu_fused_multiply_add, METH_NOARGS,
     "Whether tokred's CPU kernels run their fused multiply-add variants."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef tokred_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "tokred kernels (registered as torch.ops.tokred.*)", -1,
                                           tokred_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tokred_module); }
