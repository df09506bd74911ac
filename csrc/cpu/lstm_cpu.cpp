// CPU implementation of fused_lstm::layer_forward / layer_backward.
//
// The input projection, and in the backward the weight and input gradients, are a few large
// ATen GEMMs over the whole sequence. What remains per step is the recurrent product and the
// gate math. For the small LSTMs our users train on long sequences a step costs tens of
// nanoseconds of arithmetic, so the per-step loop runs on raw pointers: no dispatcher call,
// allocation or tensor view. Only when a step's product is big enough for BLAS to pay back the
// call does the loop hand it to ATen (kGemmWork, kGemmRows), and only when a step's work pays
// for waking a second thread does it split the work across threads (kParallelWork).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <unistd.h>

#include "../lstm_common.h"
#include "../lstm_gates.h"
#include "clones.h"

namespace fused_lstm {
namespace {

// Multiply-adds of one thread's share of a single row's step product above which ATen's GEMV
// (MKL) beats the loops.
constexpr int64_t kGemmWork = 1 << 20;
// Rows of a step from which ATen's GEMM (MKL) takes over from the packed panels: it re-packs W
// at every call, which only this many rows pay back (level at 256 rows of H = 512, one thread).
constexpr int64_t kGemmRows = 256;
// Multiply-adds (or unit updates x 32) of one step above which the step is split across
// threads: waking the pool and joining it costs a few microseconds, about 1 << 18 FMAs here.
constexpr int64_t kParallelWork = 1 << 19;

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
  const bool sweep = K * ldm * static_cast<int64_t>(sizeof(T)) > (int64_t{1} << 18);
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
// multiples of 64 bytes or ldm, so no scalar tail is left. The register width is the machine's
// and the tiles' accumulator counts follow its register file (4 x 2 of AVX2's 16 registers,
// 4 x 4 of AVX-512's 32): more would spill to the stack.
template <typename T>
FL_CPU_CLONES void vec_mat_rows(const T* __restrict a, const T* __restrict M, int64_t K,
                                int64_t ldm, int64_t N, T* __restrict out, int64_t b0,
                                int64_t b1, int64_t c0, int64_t c1, bool accumulate) {
  static const int64_t reg_bytes = __builtin_cpu_supports("avx512f") ? 64
                                   : __builtin_cpu_supports("avx2")  ? 32
                                                                     : 16;
  if (reg_bytes == 64) {
    vec_mat_cols<T, 64, 4>(a, M, K, ldm, N, out, b0, b1, c0, c1, accumulate);
  } else if (reg_bytes == 32) {
    vec_mat_cols<T, 32, 2>(a, M, K, ldm, N, out, b0, b1, c0, c1, accumulate);
  } else {
    vec_mat_cols<T, 16, 2>(a, M, K, ldm, N, out, b0, b1, c0, c1, accumulate);
  }
}

// out[r, c0:c1] (+)= a[r] W[c0:c1]^T for rows r < bs, reading W (N, K) where it is, with strides
// (sn, sk): the product of a one-step call, which reads W once, so that copying it into
// StepProduct's layout first would cost more than the product (it was 13 of the 181 thousand
// instructions of a FusedLSTMCell step at H = 20, the product 1.5). Each output sums over k in
// order. With W^T's rows contiguous (sn = 1, the backward's w_hh^T) the sums are axpys over
// them, which vectorise; otherwise dot products, eight outputs at once to keep eight
// independent chains in flight.
template <typename T>
FL_CPU_CLONES void direct_rows(const T* __restrict a, const T* __restrict w, int64_t sn,
                               int64_t sk, int64_t K, T* __restrict out, int64_t N, int64_t bs,
                               int64_t c0, int64_t c1, bool accumulate) {
  constexpr int64_t kChains = 8;
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

// Bytes of columns in one packed panel of a weight: two AVX-512 registers, four AVX2 ones.
constexpr int64_t kPanelBytes = 128;

// R rows x NV registers of columns of out (+)= a . panel, where the panel holds the block's
// columns of W^T contiguously, k by k (row stride kPanelBytes): every load of it is sequential
// and feeds R rows, so the loop is bound by the FMA units rather than by reading W.
template <typename T, int64_t R, int64_t NV, int64_t Bytes>
inline __attribute__((always_inline)) void panel_tile(const T* __restrict a, int64_t K,
                                                      const T* __restrict panel,
                                                      T* __restrict o, int64_t ldo, int64_t n,
                                                      bool accumulate) {
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
// AVX-512's 32 registers, 6 x 2 of AVX2's 16, 4 x 2 of SSE's 16.
template <typename T>
FL_CPU_CLONES void packed_rows(const T* __restrict a, const T* __restrict packed, int64_t K,
                               int64_t N, int64_t Nb, int64_t ppb, T* __restrict out, int64_t bs,
                               int64_t p0, int64_t p1, bool accumulate) {
  static const int64_t reg_bytes = __builtin_cpu_supports("avx512f") ? 64
                                   : __builtin_cpu_supports("avx2")  ? 32
                                                                     : 16;
  if (reg_bytes == 64) {
    panel_rows<T, 64, 8>(a, packed, K, N, Nb, ppb, out, bs, p0, p1, accumulate);
  } else if (reg_bytes == 32) {
    panel_rows<T, 32, 6>(a, packed, K, N, Nb, ppb, out, bs, p0, p1, accumulate);
  } else {
    panel_rows<T, 16, 4>(a, packed, K, N, Nb, ppb, out, bs, p0, p1, accumulate);
  }
}

template <typename F>
inline void for_rows(int64_t rows, int64_t work, const F& f) {
  if (work >= kParallelWork && rows > 1) {
    at::parallel_for(0, rows, 1, f);
  } else {
    f(0, rows);
  }
}

// Bytes of one core's L2 cache, asked once (1 MiB where the system does not say).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return b > 0 ? static_cast<int64_t>(b) : int64_t{1} << 20;
  }();
  return bytes;
}

// A per-step product out[r0 : r0+bs] (+)= a[a0 : a0+bs] @ W^T with W (N, K), on whole
// contiguous (rows, K) / (rows, N) buffers. Small steps loop over raw pointers taken once per
// sequence (a tensor view or data_ptr() per step would cost more than the arithmetic); large
// ones are ATen GEMMs on views. Threads split the columns, where W is too big for the rows'
// split below: each thread then reads only its slice of W at every step, which stays in its
// own core's cache across the sequence, and a batch of one still gets every core.
//
// W is copied once per call into the layout its loops read: batches of more than one row
// (max_rows > 1) get W^T in panels of kPanelBytes columns (panel_rows), a batch of one row gets
// W^T whole, zero-padded to whole registers (vec_mat_rows: its sweep reads W^T's rows in order).
// BLAS re-packs W at every call, which at a step's sizes costs as much as the product. A call
// of one step (steps = 1) reads W in place instead (direct_rows).
//
// Where the packed W fits twice in a core's L2 and the batch gives each thread a few rows,
// threads split the rows instead (splits_rows): each reads all of W from its own L2, and writes
// whole rows of out that no other core touches. Split by columns, two threads each wrote every
// row's cache lines next to the other's, and with the lines moving between the cores each ran
// its half of a step (mid-B16: 16 rows, 512 columns) about as slowly as one thread ran all of it.
//
// With gate_blocks, the panels pad each of W's four gate blocks of N / 4 columns on its own, so
// that a range of panels in every block covers whole units: `fused` then runs a thread's units'
// gate math right after their product, in the same parallel region and while their
// pre-activations are in its cache. It is taken where it adds at most one panel in eight and
// the batch is below ATen's GEMM (whose columns are W's own).
template <typename T>
struct StepProduct {
  static constexpr int64_t kPad = 64 / sizeof(T), kPanel = kPanelBytes / sizeof(T);
  at::Tensor W, Wt;  // W (N, K) as given; Wt: W^T packed as above
  int64_t K, N, ldt, split;
  int64_t blocks = 1, Nb, ppb;  // column blocks of Nb columns, each padded to ppb panels
  int64_t threads;  // asked once per call: a call into the thread pool costs more than a small step
  bool panels, direct;
  const T *pwt, *pw;
  const at::Tensor *a, *out;
  const T* pa;
  T* pout;

  StepProduct(const at::Tensor& w, const at::Tensor& a_buf, const at::Tensor& out_buf,
              int64_t max_rows, int64_t steps, bool gate_blocks = false)
      : W(w), K(w.size(1)), N(w.size(0)),
        threads(at::in_parallel_region() ? 1 : at::get_num_threads()),
        panels(max_rows > 1 && steps > 1), direct(steps == 1), pw(w.const_data_ptr<T>()),
        a(&a_buf), out(&out_buf),
        pa(a_buf.const_data_ptr<T>()), pout(out_buf.data_ptr<T>()) {
    split = panels ? kPanel : kPad;
    const auto whole = [](int64_t n, int64_t m) { return (n + m - 1) / m; };
    if (gate_blocks && panels && max_rows < kGemmRows &&
        4 * whole(N / 4, kPanel) * 8 <= whole(N, kPanel) * 9) {
      blocks = 4;
    }
    Nb = N / blocks;
    ppb = whole(Nb, split);
    ldt = blocks * ppb * split;
    if (direct) return;
    Wt = at::empty({K, ldt}, w.options());
    T* pt = Wt.data_ptr<T>();
    pwt = pt;
    if (!panels && K * ldt > (int64_t{1} << 16)) {  // ATen's blocked transposing copy
      Wt.narrow(1, N, ldt - N).zero_();
      Wt.narrow(1, 0, N).copy_(w.t());
      return;
    }
    // A raw loop: at small sizes two ATen calls cost more than a small layer's whole step.
    // Packed column c, row k of W^T lives at [c / width][k][c % width] of panels width wide;
    // it is column (c / (ppb split)) Nb + c % (ppb split) of W, or padding.
    const int64_t sn = w.stride(0), sk = w.stride(1), width = panels ? kPanel : ldt;
    for (int64_t p = 0; p < ldt / width; ++p) {
      for (int64_t k = 0; k < K; ++k) {
        T* row = pt + (p * K + k) * width;
        for (int64_t j = 0; j < width; ++j) {
          const int64_t c = p * width + j, local = c % (ppb * split);
          row[j] = local < Nb ? pw[(c / (ppb * split) * Nb + local) * sn + k * sk] : T(0);
        }
      }
    }
  }

  // Columns [c0, c1) (c1 <= ldt, both multiples of split) of the product, on the calling thread.
  void columns(int64_t a0, int64_t r0, int64_t bs, int64_t c0, int64_t c1, bool accumulate) const {
    const int64_t n = std::min(c1, N) - c0;
    if (n <= 0) return;
    if (panels ? bs >= kGemmRows : bs * K * n >= kGemmWork) {
      auto o = out->narrow(0, r0, bs).narrow(1, c0, n);
      const auto x = a->narrow(0, a0, bs);
      const auto w = W.narrow(0, c0, n).t();
      if (accumulate) {
        o.addmm_(x, w);
      } else {
        at::mm_out(o, x, w);
      }
    } else if (direct) {
      direct_rows<T>(pa + a0 * K, pw, W.stride(0), W.stride(1), K, pout + r0 * N, N, bs, c0,
                     c0 + n, accumulate);
    } else if (panels) {
      packed_rows<T>(pa + a0 * K, pwt, K, N, Nb, ppb, pout + r0 * N, bs, c0 / kPanel,
                     c1 / kPanel, accumulate);
    } else {
      vec_mat_rows<T>(pa + a0 * K, pwt, K, ldt, N, pout + r0 * N, 0, bs, c0, c1, accumulate);
    }
  }

  bool parallel(int64_t bs) const { return bs * K * N >= kParallelWork && threads > 1; }

  bool splits_rows(int64_t bs) const {
    return panels && parallel(bs) && bs < kGemmRows && bs >= 4 * threads &&
           2 * K * ldt * static_cast<int64_t>(sizeof(T)) <= l2_bytes();
  }

  // Whether fused runs the product and the epilogue in one pass: by rows, or by units of the
  // gate blocks.
  bool fuses(int64_t bs) const { return blocks > 1 || splits_rows(bs); }

  // Rows [b0, b1) of the product, every panel, on the calling thread.
  void panel_rows_of(int64_t a0, int64_t r0, int64_t b0, int64_t b1, bool accumulate) const {
    packed_rows<T>(pa + (a0 + b0) * K, pwt, K, N, Nb, ppb, pout + (r0 + b0) * N, b1 - b0, 0,
                   ldt / kPanel, accumulate);
  }

  // f(b0, b1) for each thread's rows, in one parallel region.
  template <typename F>
  void by_rows(int64_t bs, const F& f) const {
    const int64_t chunk = (bs + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) f(std::min(t * chunk, bs), std::min((t + 1) * chunk, bs));
    });
  }

  // Where fuses(bs): the product and then epilogue(b0, b1, j0, j1) for rows [b0, b1) and
  // columns [j0, j1) of each of W's four gates (N / 4 columns each), a thread's share at a time: its rows (splits_rows), else its
  // units, the product of each block's panels [u0, u1).
  template <typename F>
  void fused(int64_t a0, int64_t r0, int64_t bs, bool accumulate, const F& epilogue) const {
    if (splits_rows(bs)) {
      by_rows(bs, [&](int64_t b0, int64_t b1) {
        if (b0 == b1) return;
        panel_rows_of(a0, r0, b0, b1, accumulate);
        epilogue(b0, b1, 0, N / 4);
      });
      return;
    }
    const auto units = [&](int64_t u0, int64_t u1) {
      for (int64_t q = 0; q < blocks; ++q) {
        packed_rows<T>(pa + a0 * K, pwt, K, N, Nb, ppb, pout + r0 * N, bs, q * ppb + u0,
                       q * ppb + u1, accumulate);
      }
      if (u0 < u1) epilogue(0, bs, u0 * split, std::min(u1 * split, Nb));
    };
    if (!parallel(bs)) {
      units(0, ppb);
      return;
    }
    const int64_t chunk = (ppb + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) units(std::min(t * chunk, ppb), std::min((t + 1) * chunk, ppb));
    });
  }

  void operator()(int64_t a0, int64_t r0, int64_t bs, bool accumulate) const {
    if (!parallel(bs)) {
      columns(a0, r0, bs, 0, ldt, accumulate);
      return;
    }
    if (splits_rows(bs)) {
      by_rows(bs, [&](int64_t b0, int64_t b1) {
        if (b0 < b1) panel_rows_of(a0, r0, b0, b1, accumulate);
      });
      return;
    }
    // Whole panels per thread; the same split at every step keeps each slice on one core.
    const int64_t chunk = (ldt / split + threads - 1) / threads * split;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      // The pool's threads do not inherit the caller's BelowAutograd: without their own, a
      // large step's in-place GEMM on a worker went through autograd, which refuses it when
      // the weight requires grad (and otherwise records history on the kernel's buffers).
      const BelowAutograd below_autograd;
      for (int64_t t = t0; t < t1; ++t) {
        columns(a0, r0, bs, t * chunk, std::min((t + 1) * chunk, ldt), accumulate);
      }
    });
  }
};

// A layer's regularisers and resets (meanings: ops.cpp) as the step loops read them: raw
// pointers taken once per call, null where not given. The zoneout weights of row r (a row of
// the whole sequence) and unit j are at [r * ld + j]: a mask's element, or with ld = 0 a rate
// spread over one row, so that the loops read a rate and a mask alike. Without zoneout_cell,
// zc is a row of zeros (a rate of 0) for the backward, which always mixes when any is given.
template <typename T>
struct StepRegs {
  at::Tensor held[5];  // the contiguous copies the pointers point into
  const T *mask = nullptr, *zc = nullptr, *zh = nullptr, *zeros = nullptr;
  const bool* reset = nullptr;
  int64_t zc_ld = 0, zh_ld = 0;
  bool zoneout_cell = false;

  StepRegs(const Regularisers& r, const LayerDims& d, const at::TensorOptions& opts) {
    held[0] = at::zeros({d.H}, opts);
    zeros = held[0].const_data_ptr<T>();
    zc = zeros;
    if (r.recurrent_mask) {
      held[1] = r.recurrent_mask->contiguous();
      mask = held[1].const_data_ptr<T>();
    }
    zoneout_cell = r.zoneout_cell.has_value();
    if (zoneout_cell) zc = weights(*r.zoneout_cell, d.H, held[2], zc_ld);
    if (r.zoneout_hidden) zh = weights(*r.zoneout_hidden, d.Hr, held[3], zh_ld);
    if (r.reset) {
      held[4] = r.reset->contiguous();
      reset = held[4].const_data_ptr<bool>();
    }
  }

  static const T* weights(const at::Tensor& z, int64_t width, at::Tensor& held, int64_t& ld) {
    const bool rate = z.dim() == 0;
    held = rate ? z.expand({width}).contiguous() : z.reshape({-1, width}).contiguous();
    ld = rate ? 0 : width;
    return held.const_data_ptr<T>();
  }
};

// Gate math of units [j0, j1) of rows b0..b1 of one step: z (bs, 4H) holds the pre-activations
// and receives the activations; c (bs, H) is c_{t-1} in, c_t out; cell (bs, H) saves c_t;
// m (bs, H) gets m_t. slope (4H) is gate_slope of each column. For all units the four gates are
// one pass over the row's 4H contiguous values, which is whole registers for any even H and
// independent work throughout; a pass per gate would leave a partial register at the end of
// each of the seeds' H = 4..20.
// With Zoneout, c_t mixes c_{t-1} and the plain update with the weights of row b at
// zc[b * zc_ld] (StepRegs), and m_t stays that of the plain update.
template <typename T, bool Zoneout>
FL_CPU_CLONES void forward_pointwise_rows(T* __restrict z, T* __restrict c, T* __restrict cell,
                                          T* __restrict m, const T* __restrict slope,
                                          const T* __restrict zc, int64_t zc_ld, int64_t H,
                                          int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  const bool all = j0 == 0 && j1 == H;
  for (int64_t b = b0; b < b1; ++b) {
    T* __restrict zr = z + b * 4 * H;
    for (int64_t q = 0; q < (all ? 1 : 4); ++q) {
      for (int64_t k = q * H + j0; k < (all ? 4 * H : q * H + j1); ++k) {
        zr[k] = gate_act<T>(zr[k], slope[k]);
      }
    }
    const T* __restrict i = zr;
    const T* __restrict f = zr + H;
    const T* __restrict g = zr + 2 * H;
    const T* __restrict o = zr + 3 * H;
    T* __restrict cr = c + b * H;
    T* __restrict cellr = cell + b * H;
    T* __restrict mr = m + b * H;
    const T* __restrict dr = Zoneout ? zc + b * zc_ld : nullptr;
    for (int64_t j = j0; j < j1; ++j) {
      const CellUpdate<T> u = cell_update<T>(i[j], f[j], g[j], o[j], cr[j]);
      const T ct = Zoneout ? zoneout_mix<T>(dr[j], cr[j], u.c) : u.c;
      cr[j] = ct;
      cellr[j] = ct;
      mr[j] = u.m;
    }
  }
}

// Backward gate math of rows b0..b1 of one step. act (bs, 4H) and cell (bs, H) are the saved
// activations and c_t; row b takes c_{t-1} from prev_cell (the previously visited step) when
// b < prev_size, else from c0. dm (bs, H) is dL/dm_t; dc (bs, H) is dL/dc_t in, dL/dc_{t-1}
// out; dz (bs, 4H) receives dL/dz; m, when not null, receives m_t (for dW_hr).
// With Regs, c_{t-1} is zero where reset[b] is set (reset may be null), and dL/dc_t splits
// between the plain update, recomputed from the activations and c_{t-1} (cell holds the mixed
// state), and c_{t-1} by the zoneout weights of row b at zc[b * zc_ld] (StepRegs).
template <typename T, bool Regs>
FL_CPU_CLONES void backward_pointwise_rows(const T* __restrict act, const T* __restrict cell,
                                           const T* __restrict prev_cell, int64_t prev_size,
                                           const T* __restrict c0, const bool* __restrict reset,
                                           const T* __restrict zeros, const T* __restrict zc,
                                           int64_t zc_ld, const T* __restrict dm,
                                           T* __restrict dc, T* __restrict dz, T* __restrict m,
                                           int64_t H, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict i = act + b * 4 * H;
    const T* __restrict f = i + H;
    const T* __restrict g = i + 2 * H;
    const T* __restrict o = i + 3 * H;
    const T* __restrict cr = cell + b * H;
    const T* __restrict cp = Regs && reset && reset[b] ? zeros
                             : b < prev_size           ? prev_cell + b * H
                                                       : c0 + b * H;
    const T* __restrict dr = Regs ? zc + b * zc_ld : nullptr;
    const auto plain_c = [&](int64_t j) { return Regs ? f[j] * cp[j] + i[j] * g[j] : cr[j]; };
    const T* __restrict dmr = dm + b * H;
    T* __restrict dcr = dc + b * H;
    T* __restrict di = dz + b * 4 * H;
    T* __restrict df = di + H;
    T* __restrict dg = di + 2 * H;
    T* __restrict d_o = di + 3 * H;
    for (int64_t j = 0; j < H; ++j) {
      const ZoneoutGrad<T> split = Regs ? zoneout_grad<T>(dr[j], dcr[j]) : ZoneoutGrad<T>{dcr[j]};
      const auto u = unit_backward<T>(dmr[j], split.update, i[j], f[j], g[j], o[j], plain_c(j),
                                      cp[j]);
      di[j] = u.di;
      df[j] = u.df;
      dg[j] = u.dg;
      d_o[j] = u.do_;
      dcr[j] = Regs ? u.dc_prev + split.prev : u.dc_prev;
    }
    if (m) {
      T* __restrict mr = m + b * H;
      for (int64_t j = 0; j < H; ++j) mr[j] = unit_m<T>(o[j], plain_c(j));
    }
  }
}

// Zeroes rows b < bs of a (rows, width) state where flags[b] is set.
template <typename T>
void zero_reset_rows(const bool* flags, int64_t bs, T* state, int64_t width) {
  for (int64_t b = 0; b < bs; ++b) {
    if (flags[b]) std::fill_n(state + b * width, width, T(0));
  }
}

// The recurrence over the steps. Regs says whether regs (not null then) holds any regulariser
// or reset: without, no step does any of their work. With them, a step first zeroes the state of
// its reset rows and reads h_{t-1} * recurrent_mask from h_in in the product; the pointwise pass
// mixes c_t; h_t mixes the finished output row (after the projection) with h_{t-1} as it
// entered, which h still holds until the step's end.
template <typename T, bool Regs>
void forward_loop(const StepLayout& L, const LayerDims& d, at::Tensor& gates, at::Tensor& cells,
                  at::Tensor& output, at::Tensor& h, at::Tensor& c, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_hr, const StepRegs<T>* regs) {
  const int64_t H = d.H, Hr = d.Hr;
  at::Tensor m = d.proj ? at::empty({d.B, H}, h.options()) : at::Tensor();
  const at::Tensor h_in = Regs && regs->mask ? at::empty({d.B, Hr}, h.options()) : h;
  // gates already holds x W_ih^T + b; this adds h_{t-1} W_hh^T.
  const int64_t steps = static_cast<int64_t>(L.start.size());
  const StepProduct<T> recurrent(w_hh, h_in, gates, d.B, steps, /*gate_blocks=*/true);
  const std::optional<StepProduct<T>> projection =
      d.proj ? std::optional<StepProduct<T>>(std::in_place, *w_hr, m, output, d.B, steps)
             : std::nullopt;
  T* pz = gates.data_ptr<T>();
  T* pcell = cells.data_ptr<T>();
  T* py = output.data_ptr<T>();
  T* ph = h.data_ptr<T>();
  T* pc = c.data_ptr<T>();
  T* pm = d.proj ? m.data_ptr<T>() : nullptr;
  T* ph_in = h_in.data_ptr<T>();
  const bool zoneout_cell = Regs && regs->zoneout_cell;
  std::vector<T> slope(static_cast<size_t>(4 * H));
  for (int64_t k = 0; k < 4 * H; ++k) slope[k] = gate_slope<T>(k, H);

  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t start = L.start[s], bs = L.size[s];
    if constexpr (Regs) {
      if (regs->reset) {
        zero_reset_rows(regs->reset + start, bs, ph, Hr);
        zero_reset_rows(regs->reset + start, bs, pc, H);
      }
      if (regs->mask) {
        for (int64_t k = 0; k < bs * Hr; ++k) ph_in[k] = ph[k] * regs->mask[k];
      }
    }
    T* m_out = d.proj ? pm : py + start * Hr;
    T* y = py + start * Hr;
    // Split by rows, a thread's product reads only its own rows of h: it sets them to h_t itself
    // where h_t is m_t, rather than leaving the copy to one thread after the region, which read
    // the other cores' rows of y and then had them read back.
    const bool own_rows = !d.proj && !(Regs && regs->zh) && recurrent.splits_rows(bs);
    const auto pointwise = [&](int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
      const auto pass = zoneout_cell ? &forward_pointwise_rows<T, true>
                                     : &forward_pointwise_rows<T, false>;
      pass(pz + start * 4 * H, pc, pcell + start * H, m_out, slope.data(),
           zoneout_cell ? regs->zc + start * regs->zc_ld : nullptr,
           zoneout_cell ? regs->zc_ld : 0, H, b0, b1, j0, j1);
      if (own_rows) std::memcpy(ph + b0 * Hr, y + b0 * Hr, sizeof(T) * (b1 - b0) * Hr);
    };
    if (recurrent.fuses(bs)) {
      recurrent.fused(0, start, bs, /*accumulate=*/true, pointwise);
    } else {
      recurrent(0, start, bs, /*accumulate=*/true);
      for_rows(bs, bs * H * 32, [&](int64_t b0, int64_t b1) { pointwise(b0, b1, 0, H); });
    }
    if (projection) (*projection)(0, start, bs, /*accumulate=*/false);
    if constexpr (Regs) {
      if (regs->zh) {
        for (int64_t b = 0; b < bs; ++b) {
          const T* dr = regs->zh + (start + b) * regs->zh_ld;
          for (int64_t j = 0; j < Hr; ++j) {
            y[b * Hr + j] = zoneout_mix<T>(dr[j], ph[b * Hr + j], y[b * Hr + j]);
          }
        }
      }
    }
    if (!own_rows) std::memcpy(ph, y, sizeof(T) * bs * Hr);
  }
}

// Multiply-adds below which a call's products over the whole sequence are loops here rather
// than ATen GEMMs: at a FusedLSTMCell step's sizes every ATen call (dispatch, transposed views,
// allocation, BLAS set-up) costs more than its arithmetic, and the backward made a dozen of
// them. The input projection's loop sums over I, which does not vectorise: it gives way to BLAS
// early (measured: 25 % slower than MKL at 799 x 16 x 5, seed-chars). The gradients' loops
// vectorise over I and H.
constexpr int64_t kSmallProjection = 1 << 12;
constexpr int64_t kSmallGrads = 1 << 16;

// x W_ih^T (+ b_ih + b_hh): the gates' pre-activations from the input, for the whole sequence.
at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
  const std::optional<at::Tensor> bias =
      b_ih ? std::optional<at::Tensor>(*b_ih + *b_hh) : std::nullopt;
  if (use_onednn(x, w_ih.size(0))) return onednn_mm(x, w_ih, bias);
  return bias ? at::addmm(*bias, x, w_ih.t()) : at::mm(x, w_ih.t());
}

// z[r] = x[r] W_ih^T (+ b_ih + b_hh) for rows r of x (rows, I); W_ih (G, I); z (rows, G).
template <typename T>
void small_input_projection(const T* __restrict x, int64_t rows, int64_t I,
                            const T* __restrict w_ih, int64_t G, const T* b_ih, const T* b_hh,
                            T* __restrict z) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      T sum = b_ih ? b_ih[g] + b_hh[g] : T(0);
      for (int64_t i = 0; i < I; ++i) sum += x[r * I + i] * w_ih[g * I + i];
      z[r * G + g] = sum;
    }
  }
}

// sequence_grads without a projection in one pass over dz (rows, G): grad_input = dz W_ih,
// grad_w_ih = dz^T x, grad_w_hh = dz^T h_prev, grad_bias = the sum of dz's rows, each summed
// over rows in order. The outputs come zeroed.
template <typename T>
void small_sequence_grads(const T* __restrict dz, int64_t rows, int64_t G, const T* __restrict x,
                          int64_t I, const T* __restrict h_prev, int64_t Hr,
                          const T* __restrict w_ih, T* __restrict grad_x,
                          T* __restrict grad_w_ih, T* __restrict grad_w_hh,
                          T* __restrict grad_bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * I;
    const T* hr = h_prev + r * Hr;
    T* gxr = grad_x + r * I;
    for (int64_t g = 0; g < G; ++g) {
      const T d = dz[r * G + g];
      grad_bias[g] += d;
      for (int64_t i = 0; i < I; ++i) {
        gxr[i] += d * w_ih[g * I + i];
        grad_w_ih[g * I + i] += d * xr[i];
      }
      for (int64_t j = 0; j < Hr; ++j) grad_w_hh[g * Hr + j] += d * hr[j];
    }
  }
}

// The loops run in float or double; half and bfloat16 storage computes in float.
bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  const LayerDims d = check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const Regularisers regs{recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  check_regularisers(regs, d, input);
  if (is_reduced(input)) {
    auto r = layer_forward_cpu(input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                               c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                               to_float(b_ih), to_float(b_hh), to_float(w_hr), reverse,
                               to_float(recurrent_mask), to_float(zoneout_cell),
                               to_float(zoneout_hidden), reset);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const at::Tensor x = input.reshape({-1, d.I});
  const bool small = L.rows * 4 * d.H * d.I < kSmallProjection;
  at::Tensor gates = small ? at::empty({L.rows, 4 * d.H}, x.options())
                           : input_projection(x, w_ih, b_ih, b_hh);
  at::Tensor cells = at::empty({L.rows, d.H}, x.options());
  at::Tensor output = at::empty({L.rows, d.Hr}, x.options());
  at::Tensor h = h0.contiguous().clone();
  at::Tensor c = c0.contiguous().clone();
  const at::Tensor whh = w_hh.contiguous();
  const std::optional<at::Tensor> whr = w_hr ? std::optional(w_hr->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_forward_cpu", [&] {
    if (small) {
      const at::Tensor xc = x.contiguous(), wih = w_ih.contiguous();
      const at::Tensor bih = b_ih ? b_ih->contiguous() : at::Tensor();
      const at::Tensor bhh = b_hh ? b_hh->contiguous() : at::Tensor();
      small_input_projection<scalar_t>(
          xc.const_data_ptr<scalar_t>(), L.rows, d.I, wih.const_data_ptr<scalar_t>(), 4 * d.H,
          b_ih ? bih.const_data_ptr<scalar_t>() : nullptr,
          b_hh ? bhh.const_data_ptr<scalar_t>() : nullptr, gates.data_ptr<scalar_t>());
    }
    if (regs.any()) {
      const StepRegs<scalar_t> step_regs(regs, d, x.options());
      forward_loop<scalar_t, true>(L, d, gates, cells, output, h, c, whh, whr, &step_regs);
    } else {
      forward_loop<scalar_t, false>(L, d, gates, cells, output, h, c, whh, whr, nullptr);
    }
  });
  return {shaped_like_input(input, output), h, c, shaped_like_input(input, gates),
          shaped_like_input(input, cells)};
}

// The reverse recurrence; Regs and regs as in forward_loop. With them, dL/dh_t splits by
// zoneout_hidden into what reaches the plain output (the projection and the gates) and what is
// kept for h_{t-1} (dh_kept); the pointwise pass splits dL/dc_t likewise; dL/dh_{t-1} is then
// (dz W_hh) * recurrent_mask + the kept part, and nothing flows on from a reset row.
template <typename T, bool Regs>
void backward_loop(const StepLayout& L, const LayerDims& d, const T* dy, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, at::Tensor& dz_all, at::Tensor& dh,
                   at::Tensor& dc, at::Tensor& dh_all, at::Tensor& m_all,
                   const StepRegs<T>* regs) {
  const int64_t H = d.H, Hr = d.Hr;
  at::Tensor dm = d.proj ? at::empty({d.B, H}, dh.options()) : dh;
  at::Tensor dh_kept = Regs && regs->zh ? at::empty({d.B, Hr}, dh.options()) : at::Tensor();
  T* pkept = dh_kept.defined() ? dh_kept.data_ptr<T>() : nullptr;
  // dh_{t-1} = dz W_hh and dm = dh W_hr: products with the transposed weights.
  const int64_t steps = static_cast<int64_t>(L.start.size());
  const StepProduct<T> recurrent(w_hh.t(), dz_all, dh, d.B, steps);
  const std::optional<StepProduct<T>> projection =
      d.proj ? std::optional<StepProduct<T>>(std::in_place, w_hr->t(), dh, dm, d.B, steps)
             : std::nullopt;
  const T* pact = gates.const_data_ptr<T>();
  const T* pcell = cells.const_data_ptr<T>();
  const T* pc0 = c0.const_data_ptr<T>();
  const T* pdm = dm.const_data_ptr<T>();
  T* pdz = dz_all.data_ptr<T>();
  T* pdh = dh.data_ptr<T>();
  T* pdc = dc.data_ptr<T>();
  T* pdh_all = d.proj ? dh_all.data_ptr<T>() : nullptr;
  T* pm_all = d.proj ? m_all.data_ptr<T>() : nullptr;

  for (int64_t s = static_cast<int64_t>(L.start.size()) - 1; s >= 0; --s) {
    const int64_t start = L.start[s], bs = L.size[s];
    const int64_t prev_start = s > 0 ? L.start[s - 1] : 0, prev_size = s > 0 ? L.size[s - 1] : 0;
    if (dy) {
      const T* dyr = dy + start * Hr;
      for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] += dyr[k];
    }
    if constexpr (Regs) {
      if (regs->zh) {
        for (int64_t b = 0; b < bs; ++b) {
          const T* dr = regs->zh + (start + b) * regs->zh_ld;
          for (int64_t j = 0; j < Hr; ++j) {
            const ZoneoutGrad<T> split = zoneout_grad<T>(dr[j], pdh[b * Hr + j]);
            pdh[b * Hr + j] = split.update;
            pkept[b * Hr + j] = split.prev;
          }
        }
      }
    }
    if (projection) {
      std::memcpy(pdh_all + start * Hr, pdh, sizeof(T) * bs * Hr);
      (*projection)(0, 0, bs, /*accumulate=*/false);
    }
    const auto pointwise = [&](int64_t b0, int64_t b1) {
      if constexpr (Regs) {
        backward_pointwise_rows<T, true>(
            pact + start * 4 * H, pcell + start * H, pcell + prev_start * H, prev_size, pc0,
            regs->reset ? regs->reset + start : nullptr, regs->zeros,
            regs->zc + start * regs->zc_ld, regs->zc_ld, pdm, pdc, pdz + start * 4 * H,
            pm_all ? pm_all + start * H : nullptr, H, b0, b1);
      } else {
        backward_pointwise_rows<T, false>(pact + start * 4 * H, pcell + start * H,
                                          pcell + prev_start * H, prev_size, pc0, nullptr,
                                          nullptr, nullptr, 0, pdm, pdc, pdz + start * 4 * H,
                                          pm_all ? pm_all + start * H : nullptr, H, b0, b1);
      }
    };
    // A row's dh_{t-1} needs only its own row of dz: split by rows, each thread runs both.
    if (recurrent.splits_rows(bs)) {
      recurrent.by_rows(bs, [&](int64_t b0, int64_t b1) {
        if (b0 == b1) return;
        pointwise(b0, b1);
        recurrent.panel_rows_of(start, 0, b0, b1, /*accumulate=*/false);
      });
    } else {
      for_rows(bs, bs * H * 32, pointwise);
      recurrent(start, 0, bs, /*accumulate=*/false);
    }
    if constexpr (Regs) {
      if (regs->mask) {
        for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] *= regs->mask[k];
      }
      if (pkept) {
        for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] += pkept[k];
      }
      if (regs->reset) {
        zero_reset_rows(regs->reset + start, bs, pdh, Hr);
        zero_reset_rows(regs->reset + start, bs, pdc, H);
      }
    }
  }
}

// h_{t-1} of every row, rebuilt from output and h0 rather than saved by the forward; which row
// each one comes from is lstm_common.h's h_prev_sources, shared with the CUDA backend.
template <typename T>
void gather_h_prev(const StepLayout& L, int64_t Hr, const T* py, const T* ph0, T* out) {
  const std::vector<int64_t> src = h_prev_sources(L);
  for (int64_t r = 0; r < L.rows; ++r) {
    const T* from = src[r] >= 0 ? py + src[r] * Hr : ph0 + (-1 - src[r]) * Hr;
    std::memcpy(out + r * Hr, from, sizeof(T) * Hr);
  }
}

// Turns gather_h_prev's h_{t-1} into what entered the recurrent product (for dW_hh): zero at
// the reset rows, times recurrent_mask.
template <typename T>
void regularise_h_prev(const StepLayout& L, int64_t Hr, const StepRegs<T>& regs, T* h_prev) {
  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t start = L.start[s];
    if (regs.reset) zero_reset_rows(regs.reset + start, L.size[s], h_prev + start * Hr, Hr);
    if (!regs.mask) continue;
    T* hr = h_prev + start * Hr;
    for (int64_t k = 0; k < L.size[s] * Hr; ++k) hr[k] *= regs.mask[k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cpu(const std::optional<at::Tensor>& grad_output,
                   const std::optional<at::Tensor>& grad_h_n,
                   const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                   const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                   const std::optional<at::Tensor>& recurrent_mask,
                   const std::optional<at::Tensor>& zoneout_cell,
                   const std::optional<at::Tensor>& zoneout_hidden,
                   const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  const LayerDims d =
      check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const Regularisers regs{recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  check_regularisers(regs, d, input);
  check_grads(grad_output, grad_h_n, grad_c_n, output, h0, c0);
  if (is_reduced(input)) {
    auto r = layer_backward_cpu(to_float(grad_output), to_float(grad_h_n), to_float(grad_c_n),
                                input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                                c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                                to_float(w_hr), output.to(at::kFloat), gates.to(at::kFloat),
                                cells.to(at::kFloat), reverse, to_float(recurrent_mask),
                                to_float(zoneout_cell), to_float(zoneout_hidden), reset);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt), std::get<5>(r).to(dt),
            std::get<6>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const auto opts = input.options();
  const FlatSequence seq = flatten_sequence(d, input, gates, cells, output, grad_output);
  const at::Tensor &acts = seq.acts, &cs = seq.cells, &y = seq.y, &dy = seq.dy;
  at::Tensor dh = grad_h_n ? grad_h_n->contiguous().clone() : at::zeros({d.B, d.Hr}, opts);
  at::Tensor dc = grad_c_n ? grad_c_n->contiguous().clone() : at::zeros({d.B, d.H}, opts);
  at::Tensor dz = at::empty({L.rows, 4 * d.H}, opts);
  at::Tensor h_prev = at::empty({L.rows, d.Hr}, opts);
  at::Tensor dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor();
  at::Tensor m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const bool small = !d.proj && L.rows * 4 * d.H * (2 * d.I + d.Hr) < kSmallGrads;
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr;
  if (small) {
    grad_input = at::empty(input.sizes(), opts);
    grad_w_ih = at::empty({4 * d.H, d.I}, opts);
    grad_w_hh = at::empty({4 * d.H, d.Hr}, opts);
    grad_bias = at::empty({4 * d.H}, opts);
    grad_w_hr = at::empty({0}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_backward_cpu", [&] {
    const scalar_t* pdy = dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr;
    gather_h_prev<scalar_t>(L, d.Hr, y.const_data_ptr<scalar_t>(), h0c.const_data_ptr<scalar_t>(),
                            h_prev.data_ptr<scalar_t>());
    if (regs.any()) {
      const StepRegs<scalar_t> step_regs(regs, d, opts);
      backward_loop<scalar_t, true>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all,
                                    m_all, &step_regs);
      regularise_h_prev<scalar_t>(L, d.Hr, step_regs, h_prev.data_ptr<scalar_t>());
    } else {
      backward_loop<scalar_t, false>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all,
                                     m_all, nullptr);
    }
    if (!small) return;
    const at::Tensor x = seq.x.contiguous(), wih = w_ih.contiguous();
    for (at::Tensor* t : {&grad_input, &grad_w_ih, &grad_w_hh, &grad_bias}) {
      std::fill_n(t->data_ptr<scalar_t>(), t->numel(), scalar_t(0));
    }
    small_sequence_grads<scalar_t>(
        dz.const_data_ptr<scalar_t>(), L.rows, 4 * d.H, x.const_data_ptr<scalar_t>(), d.I,
        h_prev.const_data_ptr<scalar_t>(), d.Hr, wih.const_data_ptr<scalar_t>(),
        grad_input.data_ptr<scalar_t>(), grad_w_ih.data_ptr<scalar_t>(),
        grad_w_hh.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>());
  });
  if (!small) {
    std::tie(grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr) =
        sequence_grads(d, input, seq, w_ih, dz, h_prev, dh_all, m_all);
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("layer_forward", &layer_forward_cpu);
  m.impl("layer_backward", &layer_backward_cpu);
  m.impl("cell_forward", &cell_forward<&layer_forward_cpu>);
  m.impl("cell_backward", &cell_backward<&layer_backward_cpu>);
}

}  // namespace fused_lstm
