#include "../step_loops.cuh"  // one dtype and direction per file (step_loops.h)
FL_BACKWARD_STEPS(float)
