// Small kernels for the emulator's own tests (tests/test_emulator.py): one correct kernel per
// feature, and one planted bug of each kind the emulator must catch.
#pragma once

#include <torch/extension.h>

namespace fused_lstm {
namespace emulator_selftest {

void define(pybind11::module m);

}  // namespace emulator_selftest
}  // namespace fused_lstm
