// The emulator's C entry points, read by the tests through ctypes.
#include "simt/simt.h"

extern "C" const char* simt_kernel_runs() {
  static std::string text;
  ::simt::KernelRuns& k = ::simt::kernel_runs();
  std::lock_guard<std::mutex> lock(k.mutex);
  std::ostringstream o;
  for (const auto& [name, blocks] : k.runs) o << name << " " << blocks << "\n";
  text = o.str();
  return text.c_str();
}
