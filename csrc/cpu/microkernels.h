// The register-tile micro-kernels of a step's product, per ISA (isa.h): a single row against
// W^T swept in order (VecMatRows), W read in place for a one-step call (DirectRows), and rows
// against W^T packed in panels (PackedRows). What calls them: step_product.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../tuning.h"
#include "isa.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

using namespace tuning;

#if defined(__clang__)
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_UNROLL _Pragma("GCC unroll 16")
#endif

// o[0:n] (+)= a[0:K] . M[:, 0:n] for one row, M's rows read in order, four at a time so o
// (in L1) is loaded and stored once per four rows of M.
template <typename T>
inline __attribute__((always_inline)) void vec_mat_sweep(const T* __restrict a,
                                                         const T* __restrict M, int64_t K,
                                                         int64_t ldm, int64_t n, T* __restrict o,
                                                         bool accumulate) {
  if (!accumulate) std::memset(o, 0, sizeof(T) * n);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const T a0 = a[k], a1 = a[k + 1], a2 = a[k + 2], a3 = a[k + 3];
    const T* __restrict m0 = M + k * ldm;
    const T* __restrict m1 = m0 + ldm;
    const T* __restrict m2 = m1 + ldm;
    const T* __restrict m3 = m2 + ldm;
    for (int64_t j = 0; j < n; ++j) o[j] += (a0 * m0[j] + a1 * m1[j]) + (a2 * m2[j] + a3 * m3[j]);
  }
  for (; k < K; ++k) {
    const T ak = a[k];
    const T* __restrict m0 = M + k * ldm;
    for (int64_t j = 0; j < n; ++j) o[j] += ak * m0[j];
  }
}

// GCC vector of Bytes / sizeof(T) lanes: the row tiles below name their registers explicitly,
// which GCC's loop vectoriser does not manage for a two-dimensional accumulator array.
// Their loops over registers (bounds NV, S, R) must be unrolled before GCC decides where the
// accumulator arrays live: left as loops they are kept in memory, and every FMA goes through
// the stack.
template <typename T, int64_t Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};

// o[0:n] (+)= the first n lanes of NV registers of accumulators. A block at the end of a row
// runs into M's zero padding and stores part of its lanes, through a buffer: indexing a lane
// with a variable would make the compiler keep the whole accumulator array in memory, in the
// hot loop too.
template <typename T, int64_t NV, int64_t Bytes>
inline __attribute__((always_inline)) void store_block(typename VecOf<T, Bytes>::type* acc,
                                                       T* __restrict o, int64_t n,
                                                       bool accumulate) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  if (n >= NV * L) {
    FL_UNROLL
    for (int64_t j = 0; j < NV; ++j) {
      if (accumulate) {
        V prev;
        std::memcpy(&prev, o + j * L, Bytes);
        acc[j] += prev;
      }
      std::memcpy(o + j * L, &acc[j], Bytes);
    }
    return;
  }
  T lanes[NV * L];
  std::memcpy(lanes, acc, NV * Bytes);
  for (int64_t i = 0; i < n; ++i) o[i] = accumulate ? o[i] + lanes[i] : lanes[i];
}

// R rows x NV registers of columns of out (+)= a . M at once, K split over S interleaved sums.
// Every load of M feeds R rows, so a batch step is bound by the FMA units, not by reading M once
// per row; R x NV independent accumulator chains hide the FMA latency there (S = 1). A row alone
// (R = 1: the seeds' unbatched steps, one long chain of these) has no other rows to hide it
// behind, and splits K instead: S x NV chains of K / S.
template <typename T, int64_t R, int64_t NV, int64_t S, int64_t Bytes>
inline __attribute__((always_inline)) void vec_mat_tile(const T* __restrict a,
                                                        const T* __restrict M, int64_t K,
                                                        int64_t ldm, int64_t N, int64_t n0,
                                                        T* __restrict o, bool accumulate) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T);
  V acc[S * R][NV];
  FL_UNROLL
  for (int64_t i = 0; i < S * R; ++i) {
    FL_UNROLL
    for (int64_t j = 0; j < NV; ++j) acc[i][j] = V{};  // `= {}` may become a memset in memory
  }
  // acc[s * R + r] sums rows k = s (mod S) of M for row r of a; the last K % S rows go to s = 0.
  const auto fma_rows = [&](int64_t k, int64_t s) __attribute__((always_inline)) {
    V w[NV];
    FL_UNROLL
    for (int64_t j = 0; j < NV; ++j) std::memcpy(&w[j], M + k * ldm + n0 + j * L, Bytes);
    FL_UNROLL
    for (int64_t r = 0; r < R; ++r) {
      const T ar = a[r * K + k];
      FL_UNROLL
      for (int64_t j = 0; j < NV; ++j) acc[s * R + r][j] += ar * w[j];
    }
  };
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    FL_UNROLL
    for (int64_t s = 0; s < S; ++s) fma_rows(k + s, s);
  }
  for (; k < K; ++k) fma_rows(k, 0);
  FL_UNROLL
  for (int64_t r = 0; r < R; ++r) {
    FL_UNROLL
    for (int64_t s = 1; s < S; ++s) {
      FL_UNROLL
      for (int64_t j = 0; j < NV; ++j) acc[r][j] += acc[s * R + r][j];
    }
    store_block<T, NV, Bytes>(acc[r], o + r * N + n0, N - n0, accumulate);
  }
}

// Columns [c0, c1) of out[0:N] (+)= a[0:K] . M for rows b0..b1 of a (ld K) and out (ld N) with
// Bytes-wide registers: four rows at a time while there are four (vec_mat_tile), the rest one
// at a time (vec_mat_tile with K split, or vec_mat_sweep against a large M).
template <typename T, int64_t Bytes, int64_t NV>
inline __attribute__((always_inline)) void vec_mat_cols(const T* __restrict a,
                                                        const T* __restrict M, int64_t K,
                                                        int64_t ldm, int64_t N, T* __restrict out,
                                                        int64_t b0, int64_t b1, int64_t c0,
                                                        int64_t c1, bool accumulate) {
  constexpr int64_t R = 4, L = Bytes / sizeof(T), Wide = NV * L;
  int64_t b = b0;
  for (; b + R <= b1; b += R) {
    const T* ar = a + b * K;
    T* o = out + b * N;
    int64_t n0 = c0;
    for (; n0 + Wide <= c1; n0 += Wide) {
      vec_mat_tile<T, R, NV, 1, Bytes>(ar, M, K, ldm, N, n0, o, accumulate);
    }
    for (; n0 < c1; n0 += L) vec_mat_tile<T, R, 1, 1, Bytes>(ar, M, K, ldm, N, n0, o, accumulate);
  }
  // A single row against a large M (a batch of one at wide sizes) is bound by reading M: sweep
  // M's rows from start to end, which the prefetchers follow, instead of a block of columns at
  // a time down all of K, a strided walk they do not.
  const bool sweep = K * ldm * static_cast<int64_t>(sizeof(T)) > kSweepBytes;
  for (; b < b1; ++b) {
    const T* ar = a + b * K;
    T* o = out + b * N;
    if (sweep) {
      vec_mat_sweep(ar, M + c0, K, ldm, std::min(c1, N) - c0, o + c0, accumulate);
      continue;
    }
    // Four registers of columns with as many K splits as leave registers for the loads (two
    // of AVX2's 16, four of AVX-512's 32), then single registers with four splits.
    constexpr int64_t RowNV = 4, RowS = Bytes == 64 ? 4 : 2;
    int64_t n0 = c0;
    for (; n0 + RowNV * L <= c1; n0 += RowNV * L) {
      vec_mat_tile<T, 1, RowNV, RowS, Bytes>(ar, M, K, ldm, N, n0, o, accumulate);
    }
    for (; n0 < c1; n0 += L) vec_mat_tile<T, 1, 1, 4, Bytes>(ar, M, K, ldm, N, n0, o, accumulate);
  }
}

// The small-size replacement for a per-step GEMM, written as axpys over M's contiguous rows so
// it vectorises for any N. M is padded to ldm columns (see StepProduct) and c0, c1 are
// multiples of 64 bytes or ldm, so no scalar tail is left. The tiles' accumulator counts follow
// the ISA's register file (4 x 2 of AVX2's 16 registers, 4 x 4 of AVX-512's 32): more would
// spill to the stack.
template <typename T>
struct VecMatRows {
  template <CpuIsa Isa>
  static FL_ISA_BODY void run(const T* __restrict a, const T* __restrict M, int64_t K, int64_t ldm,
                              int64_t N, T* __restrict out, int64_t b0, int64_t b1, int64_t c0,
                              int64_t c1, bool accumulate) {
    constexpr int64_t Bytes = kVectorBytes<Isa>;
    vec_mat_cols<T, Bytes, Bytes == 64 ? 4 : 2>(a, M, K, ldm, N, out, b0, b1, c0, c1, accumulate);
  }
};

// R rows x C columns of o (row stride ldo) (+)= a . W[c]^T, for W's rows contiguous along k
// (stride sn between them): each output is one register of partial sums over k, L lanes apart,
// added up in lane order at the end with the scalar tail after them. The loads of a and W are
// whole registers whatever the row stride, so the loop is bound by the FMAs, where dot products
// one element at a time (the compiler keeps a float sum's order, so it cannot vectorise them)
// ran at about 7 GFLOP/s. Each output's sum depends on K alone, not on the tile, the thread or
// the ISA: the partial sums are 32 bytes wide on every one (two SSE registers on the baseline),
// so every ISA gives the same bits.
template <typename T, int64_t R, int64_t C>
inline __attribute__((always_inline)) void dot_tile(const T* __restrict a, int64_t K,
                                                    const T* __restrict w, int64_t sn,
                                                    T* __restrict o, int64_t ldo, bool accumulate) {
  constexpr int64_t Bytes = 32, L = Bytes / sizeof(T);
  using V = typename VecOf<T, Bytes>::type;
  V acc[R][C];
  FL_UNROLL
  for (int64_t r = 0; r < R; ++r) {
    FL_UNROLL
    for (int64_t c = 0; c < C; ++c) acc[r][c] = V{};
  }
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V wv[C];
    FL_UNROLL
    for (int64_t c = 0; c < C; ++c) std::memcpy(&wv[c], w + c * sn + k, Bytes);
    FL_UNROLL
    for (int64_t r = 0; r < R; ++r) {
      V av;
      std::memcpy(&av, a + r * K + k, Bytes);
      FL_UNROLL
      for (int64_t c = 0; c < C; ++c) acc[r][c] += av * wv[c];
    }
  }
  FL_UNROLL
  for (int64_t r = 0; r < R; ++r) {
    FL_UNROLL
    for (int64_t c = 0; c < C; ++c) {
      T sum = 0;
      FL_UNROLL
      for (int64_t l = 0; l < L; ++l) sum += acc[r][c][l];
      for (int64_t j = k; j < K; ++j) sum += a[r * K + j] * w[c * sn + j];
      o[r * ldo + c] = accumulate ? o[r * ldo + c] + sum : sum;
    }
  }
}

// Columns [c0, c1) of R rows by dot_tile, four columns at a time.
template <typename T, int64_t R>
inline __attribute__((always_inline)) void dot_rows(const T* __restrict a, const T* __restrict w,
                                                    int64_t sn, int64_t K, T* __restrict o,
                                                    int64_t N, int64_t c0, int64_t c1,
                                                    bool accumulate) {
  int64_t n = c0;
  for (; n + 4 <= c1; n += 4) dot_tile<T, R, 4>(a, K, w + n * sn, sn, o + n, N, accumulate);
  for (; n < c1; ++n) dot_tile<T, R, 1>(a, K, w + n * sn, sn, o + n, N, accumulate);
}

// out[r, c0:c1] (+)= a[r] W[c0:c1]^T for rows r < bs, reading W (N, K) where it is, with strides
// (sn, sk): the product of a one-step call, which reads W once, so that copying it into
// StepProduct's layout first would cost more than the product (it was 13 of the 181 thousand
// instructions of a FusedLSTMCell step at H = 20, the product 1.5). With W^T's rows contiguous
// (sn = 1, the backward's w_hh^T) the sums are axpys over them, which vectorise; with W's rows
// contiguous (sk = 1, the forward's W) dot products a register wide (dot_tile), two rows of out
// at a time, which reads each row of W once per two rows; otherwise scalar dot products, eight
// outputs at once to keep eight independent chains in flight.
template <typename T>
struct DirectRows {
  template <CpuIsa>
  static FL_ISA_BODY void run(const T* __restrict a, const T* __restrict w, int64_t sn, int64_t sk,
                              int64_t K, T* __restrict out, int64_t N, int64_t bs, int64_t c0,
                              int64_t c1, bool accumulate) {
    constexpr int64_t kChains = 8;
    if (sk == 1 && sn != 1) {
      int64_t r = 0;
      for (; r + 2 <= bs; r += 2) {
        dot_rows<T, 2>(a + r * K, w, sn, K, out + r * N, N, c0, c1, accumulate);
      }
      if (r < bs) dot_rows<T, 1>(a + r * K, w, sn, K, out + r * N, N, c0, c1, accumulate);
      return;
    }
    for (int64_t r = 0; r < bs; ++r) {
      const T* __restrict ar = a + r * K;
      T* __restrict o = out + r * N;
      if (sn == 1) {
        if (!accumulate) std::fill(o + c0, o + c1, T(0));
        for (int64_t k = 0; k < K; ++k) {
          const T x = ar[k];
          const T* __restrict wk = w + k * sk;
          for (int64_t n = c0; n < c1; ++n) o[n] += x * wk[n];
        }
        continue;
      }
      int64_t n = c0;
      for (; n + kChains <= c1; n += kChains) {
        T sum[kChains];
        FL_UNROLL
        for (int64_t j = 0; j < kChains; ++j) sum[j] = accumulate ? o[n + j] : T(0);
        for (int64_t k = 0; k < K; ++k) {
          FL_UNROLL
          for (int64_t j = 0; j < kChains; ++j) sum[j] += ar[k] * w[(n + j) * sn + k * sk];
        }
        FL_UNROLL
        for (int64_t j = 0; j < kChains; ++j) o[n + j] = sum[j];
      }
      for (; n < c1; ++n) {
        T sum = accumulate ? o[n] : T(0);
        for (int64_t k = 0; k < K; ++k) sum += ar[k] * w[n * sn + k * sk];
        o[n] = sum;
      }
    }
  }
};

// R rows x NV registers of columns of out (+)= a . panel, where the panel holds the block's
// columns of W^T contiguously, k by k (row stride kPanelBytes): every load of it is sequential
// and feeds R rows, so the loop is bound by the FMA units rather than by reading W.
template <typename T, int64_t R, int64_t NV, int64_t Bytes>
inline __attribute__((always_inline)) void panel_tile(const T* __restrict a, int64_t K,
                                                      const T* __restrict panel, T* __restrict o,
                                                      int64_t ldo, int64_t n, bool accumulate) {
  using V = typename VecOf<T, Bytes>::type;
  constexpr int64_t L = Bytes / sizeof(T), P = kPanelBytes / sizeof(T);
  V acc[R][NV];
  FL_UNROLL
  for (int64_t r = 0; r < R; ++r) {
    FL_UNROLL
    for (int64_t j = 0; j < NV; ++j) acc[r][j] = V{};
  }
  // The tile's output rows are the step's slice of the input projection, computed for the whole
  // sequence long before and no longer in cache at sizes where the loop is product-bound:
  // fetched only at the store, they stalled it (a fifth of the kernel's time at medium).
  if (accumulate) {
    FL_UNROLL
    for (int64_t r = 0; r < R; ++r) {
      FL_UNROLL
      for (int64_t j = 0; j < NV * Bytes; j += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(o + r * ldo) + j, 1);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V w[NV];
    FL_UNROLL
    for (int64_t j = 0; j < NV; ++j) std::memcpy(&w[j], panel + k * P + j * L, Bytes);
    FL_UNROLL
    for (int64_t r = 0; r < R; ++r) {
      const T ar = a[r * K + k];
      FL_UNROLL
      for (int64_t j = 0; j < NV; ++j) acc[r][j] += ar * w[j];
    }
  }
  FL_UNROLL
  for (int64_t r = 0; r < R; ++r) store_block<T, NV, Bytes>(acc[r], o + r * ldo, n, accumulate);
}

// Panels [p0, p1) of out[0:bs, 0:N] (+)= a[0:bs, 0:K] . W^T from the packed panels: each panel
// is read from cache by all rows before the next (RMain rows a tile, the rest 4, 2, 1), and the
// rows' split into tiles depends on bs only, so every thread count sums alike. W's columns come
// in blocks of Nb, each padded to ppb panels (StepProduct).
template <typename T, int64_t Bytes, int64_t RMain>
inline __attribute__((always_inline)) void panel_rows(const T* __restrict a,
                                                      const T* __restrict packed, int64_t K,
                                                      int64_t N, int64_t Nb, int64_t ppb,
                                                      T* __restrict out, int64_t bs, int64_t p0,
                                                      int64_t p1, bool accumulate) {
  constexpr int64_t NV = 2, L = Bytes / sizeof(T), P = kPanelBytes / sizeof(T);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t local = p % ppb * P, col = p / ppb * Nb + local;
    for (int64_t j0 = 0; j0 < P && local + j0 < Nb; j0 += NV * L) {
      const int64_t n = Nb - local - j0;
      const T* w = packed + p * K * P + j0;
      T* o = out + col + j0;
      int64_t b = 0;
      for (; b + RMain <= bs; b += RMain) {
        panel_tile<T, RMain, NV, Bytes>(a + b * K, K, w, o + b * N, N, n, accumulate);
      }
      if (bs - b >= 4) {
        panel_tile<T, 4, NV, Bytes>(a + b * K, K, w, o + b * N, N, n, accumulate);
        b += 4;
      }
      if (bs - b >= 2) {
        panel_tile<T, 2, NV, Bytes>(a + b * K, K, w, o + b * N, N, n, accumulate);
        b += 2;
      }
      if (bs - b >= 1) panel_tile<T, 1, NV, Bytes>(a + b * K, K, w, o + b * N, N, n, accumulate);
    }
  }
}

// Row tiles as tall as the register file holds beside the two registers of W: 8 x 2 of
// AVX-512's 32 registers, 6 x 2 of AVX2's 16, 4 x 2 of SSE's 16 (and of NEON's 32: not tuned).
template <typename T>
struct PackedRows {
  template <CpuIsa Isa>
  static FL_ISA_BODY void run(const T* __restrict a, const T* __restrict packed, int64_t K,
                              int64_t N, int64_t Nb, int64_t ppb, T* __restrict out, int64_t bs,
                              int64_t p0, int64_t p1, bool accumulate) {
    constexpr int64_t Bytes = kVectorBytes<Isa>, RMain = Bytes == 64 ? 8 : Bytes == 32 ? 6 : 4;
    panel_rows<T, Bytes, RMain>(a, packed, K, N, Nb, ppb, out, bs, p0, p1, accumulate);
  }
};

}  // namespace
}  // namespace fused_lstm
