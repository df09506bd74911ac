// Gate math of one LSTM hidden unit, forward and backward, shared by the CPU and CUDA kernels.
//
// Everything here is a __host__ __device__ function of plain scalars, so both backends compute
// exactly the same expressions and a host test can check the CUDA kernel's per-thread work.
// `acc_t` is the accumulation type (float for float/half/bfloat16 storage, double for double).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline __attribute__((always_inline))
#endif

namespace fused_lstm {

#if !defined(__CUDA_ARCH__)
// Host float exp with ~1 ulp error written so that GCC/Clang vectorise loops that call it
// (libm's expf is an opaque call that keeps the gate loops scalar). Cephes' range reduction
// x = n ln2 + r, |r| <= ln2/2, and its degree-6 polynomial for e^r.
inline __attribute__((always_inline)) float host_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline __attribute__((always_inline)) double host_exp(double x) { return std::exp(x); }
#endif

template <typename acc_t>
FL_HD acc_t exp_(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return host_exp(x);
#endif
}

template <typename acc_t>
FL_HD acc_t sigmoid_(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

// Gate activation with slope a: a sigmoid(a z) - (a - 1), i.e. sigmoid(z) for a = 1 and
// tanh(z) = 2 sigmoid(2 z) - 1 for a = 2, exactly (scaling by 2 is exact). One formula for all
// four gates lets the CPU compute them in one vectorised pass over the 4H pre-activations, and
// tanh costs one exp and one division like a sigmoid. Its absolute error is that of the sigmoid
// (about 1e-7 in float), the same as libm's tanhf everywhere but very near 0, where only the
// relative error grows; what follows (c = f c + i g, m = o tanh c) adds absolute errors.
template <typename acc_t>
FL_HD acc_t gate_act(acc_t z, acc_t a) {
  return a * sigmoid_(a * z) - (a - acc_t(1));
}

template <typename acc_t>
FL_HD acc_t tanh_(acc_t x) {
  return gate_act(x, acc_t(2));
}

// The slope of packed pre-activation k of a row of 4H: the g block (2H <= k < 3H) is a tanh.
template <typename acc_t>
FL_HD acc_t gate_slope(int64_t k, int64_t H) {
  return k >= 2 * H && k < 3 * H ? acc_t(2) : acc_t(1);
}

// Forward of one unit. In: the pre-activations z (x W_ih^T + b + h_{t-1} W_hh^T) of the four
// gates and c_{t-1}. Out: the activations (saved for the backward), c_t and m_t = o tanh(c_t)
// (h_t itself without a projection).
template <typename acc_t>
struct UnitForward {
  acc_t i, f, g, o, c, m;
};

// The state update from the four activations: c_t = f c_{t-1} + i g, m_t = o tanh(c_t).
template <typename acc_t>
struct CellUpdate {
  acc_t c, m;
};

template <typename acc_t>
FL_HD CellUpdate<acc_t> cell_update(acc_t i, acc_t f, acc_t g, acc_t o, acc_t c_prev) {
  const acc_t c = f * c_prev + i * g;
  return {c, o * tanh_(c)};
}

template <typename acc_t>
FL_HD UnitForward<acc_t> unit_forward(acc_t zi, acc_t zf, acc_t zg, acc_t zo, acc_t c_prev) {
  UnitForward<acc_t> r;
  r.i = sigmoid_(zi);
  r.f = sigmoid_(zf);
  r.g = tanh_(zg);
  r.o = sigmoid_(zo);
  const CellUpdate<acc_t> u = cell_update(r.i, r.f, r.g, r.o, c_prev);
  r.c = u.c;
  r.m = u.m;
  return r;
}

// Backward of one unit. In: dm = dL/dm_t (from the output and the next step's recurrence),
// dc = dL/dc_t arriving from step t+1, the saved activations, c_t and c_{t-1}.
// Out: dL/dz of the four gates and dL/dc_{t-1}.
template <typename acc_t>
struct UnitBackward {
  acc_t di, df, dg, do_, dc_prev;
};

template <typename acc_t>
FL_HD UnitBackward<acc_t> unit_backward(acc_t dm, acc_t dc, acc_t i, acc_t f, acc_t g, acc_t o,
                                        acc_t c, acc_t c_prev) {
  const acc_t tc = tanh_(c);
  const acc_t dct = dc + dm * o * (acc_t(1) - tc * tc);
  UnitBackward<acc_t> r;
  r.di = dct * g * i * (acc_t(1) - i);
  r.df = dct * c_prev * f * (acc_t(1) - f);
  r.dg = dct * i * (acc_t(1) - g * g);
  r.do_ = dm * tc * o * (acc_t(1) - o);
  r.dc_prev = dct * f;
  return r;
}

// Zoneout (Krueger et al. 2016): the state kept from the previous step with weight d (a 0/1
// keep mask in training, the rate in eval), the plain update with 1 - d.
template <typename acc_t>
FL_HD acc_t zoneout_mix(acc_t d, acc_t prev, acc_t next) {
  return d * prev + (acc_t(1) - d) * next;
}

// Its backward: a gradient g of the mixed state goes (1 - d) g to the plain update and d g to
// the previous step's state.
template <typename acc_t>
struct ZoneoutGrad {
  acc_t update, prev;
};

template <typename acc_t>
FL_HD ZoneoutGrad<acc_t> zoneout_grad(acc_t d, acc_t g) {
  return {(acc_t(1) - d) * g, d * g};
}

// m_t recomputed from the saved o and c_t (the projection's weight gradient needs it).
template <typename acc_t>
FL_HD acc_t unit_m(acc_t o, acc_t c) {
  return o * tanh_(c);
}

}  // namespace fused_lstm
