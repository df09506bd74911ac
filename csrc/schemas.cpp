// Defines the fused_lstm ops from fused_lstm/op_schemas.inc, the one declaration of their
// schemas, which fused_lstm/_library.py also reads where the native library is not built. Each
// device's kernels are registered for them apart (cpu/lstm_cpu.cpp, cuda/lstm_cuda.cu,
// autograd/), with TORCH_LIBRARY_IMPL.
#include <ATen/core/enum_tag.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fused_lstm {
namespace {

constexpr char kSchemas[] =
#include "../fused_lstm/op_schemas.inc"
    ;

// The tags the schemas use; a tag missing here fails the library's load, naming it.
at::Tag tag_named(const std::string& name) {
  static const std::pair<const char*, at::Tag> kTags[] = {
      {"nondeterministic_seeded", at::Tag::nondeterministic_seeded}};
  for (const auto& [known, tag] : kTags) {
    if (name == known) return tag;
  }
  TORCH_CHECK(false, "fused_lstm: op_schemas.inc names the unknown tag @", name);
}

}  // namespace
}  // namespace fused_lstm

TORCH_LIBRARY(fused_lstm, m) {
  // The fake kernels torch.compile and torch.export trace with are Python (_library.register);
  // torch imports this module for them where the library was loaded without `import fused_lstm`.
  m.set_python_module("fused_lstm._library");
  std::istringstream lines(fused_lstm::kSchemas);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::vector<at::Tag> tags;
    for (auto at = line.rfind(" @"); at != std::string::npos; at = line.rfind(" @")) {
      tags.push_back(fused_lstm::tag_named(line.substr(at + 2)));
      line.erase(at);
    }
    m.def(torch::schema(line.c_str()), std::as_const(tags));
  }
}
