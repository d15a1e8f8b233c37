// Loads an AOTInductor package of a model with tokred ops (written by make_aoti_package.py) and
// compares its output with the eager PyTorch output saved beside it. Exits non-zero on a mismatch
// or a load failure, so ctest fails.
//
// The package's compiled code calls each tokred op by name through the dispatcher, and the loader
// looks every name up when it opens the package. The ops are registered by libtokred when it is
// loaded: this program calls no tokred function, it only links tokred::tokred, whose CMake
// package keeps the library even under --as-needed. The same source linked with torch alone
// fails with "Could not find schema for tokred::..." (ctest checks that too).
//
//   tokred_aoti <package.pt2> <io.pt>
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

namespace {

std::vector<char> read_file(const char* path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(std::string("cannot open ") + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " <package.pt2> <io.pt>\n";
    return 2;
  }
  try {
    // A dict {"images", "logits"} saved by torch.save in Python.
    const c10::Dict<c10::IValue, c10::IValue> io =
        torch::jit::pickle_load(read_file(argv[2])).toGenericDict();
    const at::Tensor images = io.at("images").toTensor();
    const at::Tensor expected = io.at("logits").toTensor();

    // "model" is the name aoti_compile_and_package gives a package's one model. The device
    // comes from the package's metadata (CPU here); device_index -1 takes the current one.
    torch::inductor::AOTIModelPackageLoader loader(argv[1], "model");
    const std::vector<at::Tensor> outputs = loader.run({images});

    if (outputs.size() != 1 || !outputs[0].sizes().equals(expected.sizes())) {
      std::cout << "FAIL  the package returned " << outputs.size() << " outputs, the first of "
                << (outputs.empty() ? at::IntArrayRef{} : outputs[0].sizes()) << "; expected "
                << expected.sizes() << "\n";
      return 1;
    }
    const double diff = (outputs[0] - expected).abs().max().item<double>();
    const bool ok = at::allclose(outputs[0], expected, /*rtol=*/1e-5, /*atol=*/1e-5);
    std::cout << (ok ? "ok    " : "FAIL  ") << "AOTInductor package vs eager PyTorch, batch "
              << images.size(0) << ": max |diff| = " << diff << "\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
