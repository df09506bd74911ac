#include "../step_loops.cuh"  // one dtype and direction per file (step_loops.h)
template <>
void fused_lstm::cuda_steps::forward_steps<double>(const ForwardBuffers& b) {
  forward_loop<double>(b);
}
