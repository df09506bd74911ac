// A step's recurrent (or projection) product: W packed once per call, the thread split, and
// the hand-over to ATen's GEMM where a step is large.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__APPLE__)
#include <sys/sysctl.h>
#else
#include <unistd.h>
#endif

#include "../layer_ops.h"
#include "../tuning.h"
#include "microkernels.h"
#include "pack_cache.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

using namespace tuning;

template <typename F>
inline void for_rows(int64_t rows, int64_t work, const F& f) {
  if (work >= kParallelWork && rows > 1) {
    at::parallel_for(0, rows, 1, f);
  } else {
    f(0, rows);
  }
}

// Bytes of one core's L2 cache, asked once: from glibc's sysconf where it says (on x86-64; it
// may not elsewhere), macOS's sysctl, else kDefaultL2Bytes.
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    int64_t b = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#elif defined(__APPLE__)
    size_t size = sizeof b;
    if (sysctlbyname("hw.l2cachesize", &b, &size, nullptr, 0) != 0) b = 0;
#endif
    return b > 0 ? b : kDefaultL2Bytes;
  }();
  return bytes;
}

// The weight a StepProduct's W derives from, for the cache of packs (pack_cache.h): the call's
// own w_hh or w_hr (before a conversion to float), and whether W is it transposed.
struct PackSource {
  const at::Tensor* tensor = nullptr;
  bool transposed = false;
};

// A per-step product out[r0 : r0+bs] (+)= a[a0 : a0+bs] @ W^T with W (N, K), on whole
// contiguous (rows, K) / (rows, N) buffers. Small steps loop over raw pointers taken once per
// sequence (a tensor view or data_ptr() per step would cost more than the arithmetic); large
// ones are ATen GEMMs on views. Threads split the columns, where W is too big for the rows'
// split below: each thread then reads only its slice of W at every step, which stays in its
// own core's cache across the sequence, and a batch of one still gets every core.
//
// W is copied once per call into the layout its loops read: batches of more than one row
// (max_rows > 1) get W^T in panels of kPanelBytes columns (PackedRows), a batch of one row gets
// W^T whole, zero-padded to whole registers (VecMatRows: its sweep reads W^T's rows in order).
// BLAS re-packs W at every call, which at a step's sizes costs as much as the product. Where
// the cache of packs takes the weight (pack_cache.h), the copy is kept across calls and made
// again only when the weight changed. A call of one step (steps = 1) reads W in place instead
// (DirectRows), unless the cache takes the weight.
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

  // With a source whose pack the cache may hold (pack_cache::eligible, a function of the call
  // alone), a call of one step of 2 to kGemmRows - 1 rows reads the pack too rather than W in
  // place: cached, it costs a read of W for the checksum, and the choice does not depend on
  // whether it is cached.
  StepProduct(const at::Tensor& w, const at::Tensor& a_buf, const at::Tensor& out_buf,
              int64_t max_rows, int64_t steps, bool gate_blocks = false,
              const PackSource& source = {})
      : W(w),
        K(w.size(1)),
        N(w.size(0)),
        threads(at::in_parallel_region() ? 1 : at::get_num_threads()),
        pw(w.const_data_ptr<T>()),
        a(&a_buf),
        out(&out_buf),
        pa(a_buf.const_data_ptr<T>()),
        pout(out_buf.data_ptr<T>()) {
    layout(max_rows > 1, gate_blocks, max_rows);
    const int64_t bytes = K * ldt * static_cast<int64_t>(sizeof(T));
    // A one-step call reads the cached pack only for 2 to kGemmRows - 1 rows: from kGemmRows
    // its step is ATen's GEMM, which would not read it; a single row reads W in place as fast
    // as the pack (VecMatRows), and a hit first reads W once for its checksum.
    const bool one_step_reads_pack = max_rows > 1 && max_rows < kGemmRows;
    const bool cached = source.tensor && (steps > 1 || one_step_reads_pack) &&
                        pack_cache::eligible(*source.tensor, bytes);
    panels = max_rows > 1 && (steps > 1 || cached);
    direct = steps == 1 && !cached;
    if (panels != (max_rows > 1)) layout(panels, gate_blocks, max_rows);
    if (direct) return;
    if (cached) {
      const pack_cache::Kind kind{.layout = panels ? 1 : 2,
                                  .a = blocks,
                                  .b = source.transposed,
                                  .dtype = c10::CppTypeToScalarType<T>::value};
      Wt = pack_cache::get(*source.tensor, kind, bytes, [&] { return pack(w); });
    } else {
      Wt = pack(w);
    }
    pwt = Wt.const_data_ptr<T>();
  }

  // split, blocks, Nb, ppb and ldt for panels (or not).
  void layout(bool with_panels, bool gate_blocks, int64_t max_rows) {
    split = with_panels ? kPanel : kPad;
    const auto whole = [](int64_t n, int64_t m) { return (n + m - 1) / m; };
    blocks = gate_blocks && with_panels && max_rows < kGemmRows &&
                     4 * whole(N / 4, kPanel) * 8 <= whole(N, kPanel) * 9
                 ? 4
                 : 1;
    Nb = N / blocks;
    ppb = whole(Nb, split);
    ldt = blocks * ppb * split;
  }

  // W^T in the layout the loops read (a new tensor: a cached one is never written again).
  at::Tensor pack(const at::Tensor& w) const {
    at::Tensor packed = at::empty({K, ldt}, w.options());
    T* pt = packed.data_ptr<T>();
    if (!panels && K * ldt > kPackCopyElements) {  // ATen's blocked transposing copy
      packed.narrow(1, N, ldt - N).zero_();
      packed.narrow(1, 0, N).copy_(w.t());
      return packed;
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
    return packed;
  }

  // Columns [c0, c1) (c1 <= ldt, both multiples of split) of the product, on the calling thread.
  void columns(int64_t a0, int64_t r0, int64_t bs, int64_t c0, int64_t c1, bool accumulate) const {
    const int64_t n = std::min(c1, N) - c0;
    if (n <= 0) return;
    if (panels ? bs >= kGemmRows : direct_gemm(bs) || bs * K * n >= kGemmWork) {
      auto o = out->narrow(0, r0, bs).narrow(1, c0, n);
      const auto x = a->narrow(0, a0, bs);
      const auto w = W.narrow(0, c0, n).t();
      if (accumulate) {
        o.addmm_(x, w);
      } else {
        at::mm_out(o, x, w);
      }
    } else if (direct) {
      run_on_cpu_isa<DirectRows<T>>(pa + a0 * K, pw, W.stride(0), W.stride(1), K, pout + r0 * N, N,
                                    bs, c0, c0 + n, accumulate);
    } else if (panels) {
      run_on_cpu_isa<PackedRows<T>>(pa + a0 * K, pwt, K, N, Nb, ppb, pout + r0 * N, bs, c0 / kPanel,
                                    c1 / kPanel, accumulate);
    } else {
      run_on_cpu_isa<VecMatRows<T>>(pa + a0 * K, pwt, K, ldt, N, pout + r0 * N, int64_t{0}, bs, c0,
                                    c1, accumulate);
    }
  }

  bool parallel(int64_t bs) const { return bs * K * N >= kParallelWork && threads > 1; }

  // Whether a one-step call's product is one ATen GEMM, which then runs its own threads.
  // DirectRows reads a W whose rows are not contiguous (the forward's W_hh) with strided
  // loads; one whose rows are (the backward's W_hh^T) as axpys, which vectorise.
  bool direct_gemm(int64_t bs) const {
    return direct && W.stride(0) != 1 && bs * K * N >= kDirectGemmWork;
  }

  bool splits_rows(int64_t bs) const {
    return panels && parallel(bs) && bs < kGemmRows && bs >= kRowSplitMinRows * threads &&
           kRowSplitCopies * K * ldt * static_cast<int64_t>(sizeof(T)) <= l2_bytes();
  }

  // Whether fused runs the product and the epilogue in one pass: by rows, or by units of the
  // gate blocks.
  bool fuses(int64_t bs) const { return blocks > 1 || splits_rows(bs); }

  // Rows [b0, b1) of the product, every panel, on the calling thread.
  void panel_rows_of(int64_t a0, int64_t r0, int64_t b0, int64_t b1, bool accumulate) const {
    run_on_cpu_isa<PackedRows<T>>(pa + (a0 + b0) * K, pwt, K, N, Nb, ppb, pout + (r0 + b0) * N,
                                  b1 - b0, int64_t{0}, ldt / kPanel, accumulate);
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
  // columns [j0, j1) of each of W's four gates (N / 4 columns each), a thread's share at a time:
  // its rows (splits_rows), else its units, the product of each block's panels [u0, u1).
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
        run_on_cpu_isa<PackedRows<T>>(pa + a0 * K, pwt, K, N, Nb, ppb, pout + r0 * N, bs,
                                      q * ppb + u0, q * ppb + u1, accumulate);
      }
      if (u0 < u1) epilogue(0, bs, u0 * split, std::min(u1 * split, Nb));
    };
    if (!parallel(bs)) {
      units(0, ppb);
      return;
    }
    const int64_t chunk = (ppb + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        units(std::min(t * chunk, ppb), std::min((t + 1) * chunk, ppb));
    });
  }

  void operator()(int64_t a0, int64_t r0, int64_t bs, bool accumulate) const {
    if (!parallel(bs) || direct_gemm(bs)) {
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
      // The pool's threads do not inherit the caller's KernelGuard: without their own, a
      // large step's in-place GEMM on a worker went through autograd, which refuses it when
      // the weight requires grad (and otherwise records history on the kernel's buffers).
      const KernelGuard guard;
      for (int64_t t = t0; t < t1; ++t) {
        columns(a0, r0, bs, t * chunk, std::min((t + 1) * chunk, ldt), accumulate);
      }
    });
  }
};

}  // namespace
}  // namespace fused_lstm
