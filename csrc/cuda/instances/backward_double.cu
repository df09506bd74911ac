#include "../step_loops.cuh"  // one dtype and direction per file (step_loops.h)
template <>
void fused_lstm::cuda_steps::backward_steps<double>(const BackwardBuffers& b) {
  backward_loop<double>(b);
}
