#include "../step_loops.cuh"  // one dtype and direction per file (step_loops.h)
template <>
void fused_lstm::cuda_steps::forward_steps<c10::BFloat16>(const ForwardBuffers& b) {
  forward_loop<c10::BFloat16>(b);
}
