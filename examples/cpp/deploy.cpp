// A C++ program without Python that runs a model holding FusedLSTM and FusedLSTMCell, saved by
// export_model.py: from TorchScript (model.ts), with one training step through it (the backward
// runs fused_lstm's C++ autograd), and from an AOTInductor package (model.pt2). It needs only
// libtorch and fused_lstm's native library, whose loading registers the ops (CMakeLists.txt).
//
//   deploy DIR
//
// Reads DIR/inputs.pt, writes DIR/results.pt (torch.load reads it), keyed "ROUTE.DEVICE.NAME"
// with export_model.py's names: the CPU always; CUDA too where a GPU is visible and the library
// has the CUDA kernels (and model_cuda.pt2 for the package).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

using Results = c10::Dict<std::string, at::Tensor>;

void record(Results& results, const std::string& key, const at::Tensor& t) {
  const at::Tensor value = t.detach().cpu();
  std::cout << key << " " << value.sizes() << " sum " << value.sum().item<double>() << "\n";
  results.insert(key, value);
}

std::vector<at::Tensor> tensors_of(const c10::IValue& tuple) {
  std::vector<at::Tensor> out;
  for (const c10::IValue& v : tuple.toTupleRef().elements()) out.push_back(v.toTensor());
  return out;
}

at::Tensor loss_of(const std::vector<at::Tensor>& outputs) {  // export_model.py's loss_of
  at::Tensor loss = at::zeros({}, outputs.front().options());
  for (const at::Tensor& t : outputs) loss = loss + (t * t).sum();
  return loss;
}

void run_torchscript(const fs::path& file, const at::Tensor& x, double lr, Results& results,
                     const std::string& prefix) {
  torch::jit::Module model = torch::jit::load(file.string(), x.device());
  {
    torch::NoGradGuard no_grad;
    const std::vector<at::Tensor> outputs = tensors_of(model.forward({x}));
    for (size_t k = 0; k < outputs.size(); ++k) {
      record(results, prefix + "out" + std::to_string(k), outputs[k]);
    }
  }
  at::Tensor loss = loss_of(tensors_of(model.forward({x})));
  loss.backward();
  record(results, prefix + "loss", loss);
  torch::NoGradGuard no_grad;
  for (const auto& p : model.named_parameters()) {
    record(results, prefix + "grad." + p.name, p.value.grad());
    p.value.sub_(lr * p.value.grad());
  }
  record(results, prefix + "loss_after_step", loss_of(tensors_of(model.forward({x}))));
}

void run_package(const fs::path& file, const at::Tensor& x, Results& results,
                 const std::string& prefix) {
  torch::inductor::AOTIModelPackageLoader loader(file.string());
  const std::vector<at::Tensor> outputs = loader.run({x});
  for (size_t k = 0; k < outputs.size(); ++k) {
    record(results, prefix + "out" + std::to_string(k), outputs[k]);
  }
}

bool cuda_kernels_usable() {
  const auto op = c10::Dispatcher::singleton().findOp({"fused_lstm::layer_forward", ""});
  return torch::cuda::is_available() && op && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: deploy DIR (written by export_model.py)\n";
    return 2;
  }
  const fs::path dir = argv[1];
  std::ifstream in(dir / "inputs.pt", std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(in), {}};
  const c10::Dict<c10::IValue, c10::IValue> inputs = torch::jit::pickle_load(bytes).toGenericDict();
  const at::Tensor x = inputs.at("x").toTensor();
  const double lr = inputs.at("lr").toTensor().item<double>();

  Results results;
  std::vector<c10::Device> devices{c10::kCPU};
  if (cuda_kernels_usable()) devices.emplace_back(c10::kCUDA);
  for (const c10::Device device : devices) {
    const std::string name = device.is_cpu() ? "cpu" : "cuda";
    run_torchscript(dir / "model.ts", x.to(device), lr, results, "ts." + name + ".");
    const fs::path package = dir / (device.is_cpu() ? "model.pt2" : "model_cuda.pt2");
    if (fs::exists(package)) run_package(package, x.to(device), results, "aoti." + name + ".");
  }
  const std::vector<char> out = torch::jit::pickle_save(c10::IValue(results));
  std::ofstream(dir / "results.pt", std::ios::binary).write(out.data(), out.size());
  std::cout << "wrote " << (dir / "results.pt").string() << "\n";
  return 0;
}
