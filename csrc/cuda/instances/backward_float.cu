#include "../step_loops.cuh"  // one dtype and direction per file (step_loops.h)
template <>
void fused_lstm::cuda_steps::backward_steps<float>(const BackwardBuffers& b) {
  backward_loop<float>(b);
}
