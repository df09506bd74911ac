// The CPU kernels' tuning constants, in one place, each with the measurement that set it. The
// extension exports them to Python as fused_lstm._C.TUNING (python/module.cpp), so that the tests
// which cross a boundary build their sizes from the constant itself: change one here and its
// tests still cross it. Where a figure came from and how it was taken: benchmarks/HISTORY.md.
#pragma once

#include <cstdint>

namespace fused_lstm::tuning {

// Multiply-adds of one thread's share of a single row's step product above which ATen's GEMV
// (MKL) beats the loops.
constexpr int64_t kGemmWork = int64_t{1} << 20;

// Multiply-adds of a one-step call's forward product (a FusedLSTMCell step) from which ATen's
// GEMM takes it rather than DirectRows, which reads W_hh in place with strided loads: on the
// AVX2-only AMD EPYC (benchmarks/RESULTS.md, "FusedLSTMCell's one-step products") DirectRows
// ran B = 64, H = 64 (1M multiply-adds) at about 7 GFLOP/s and the cell's inference at 0.5x
// nn.LSTMCell's; with the GEMM from 2**16, B = 8, H = 64 (131K) lost (0.92x -> 0.79x) while
// B = 1, H = 256 (262K) and B = 256, H = 20 (410K) gained. The seeds' cells (B <= 8, H = 20: 13K)
// stay far below it, where an ATen call costs more than the product. Once direct_rows ran its
// dot products a register wide, 2**21 was tried (cell_forward alone, one thread, min thread
// time): no size from 262K to 2M gained consistently, and B = 256, H = 20 float32 took twice as
// long (80 -> 159 us), so it stayed.
constexpr int64_t kDirectGemmWork = int64_t{1} << 18;

// Rows of a step from which ATen's GEMM (MKL) takes over from the packed panels: it re-packs W
// at every call, which only this many rows pay back (level at 256 rows of H = 512, one thread).
constexpr int64_t kGemmRows = 256;

// Multiply-adds of one step above which the step is split across threads: waking the pool and
// joining it costs a few microseconds, about 1 << 18 FMAs here. A step's gate math counts each
// unit update as kPointwiseWeight multiply-adds against it.
constexpr int64_t kParallelWork = int64_t{1} << 19;
constexpr int64_t kPointwiseWeight = 32;

// Threads split a step's rows rather than its columns where each gets at least this many rows
// and the packed W fits kRowSplitCopies times in a core's L2 (one copy being read, room for
// the rows and the other thread's traffic). Split by columns, two threads wrote alternating
// cache lines of every row: at mid-B16 (16 rows, 512 columns) each ran its half of a step
// about as slowly as one thread ran all of it (rdtsc per thread: 38K cycles for half against
// 44K for all); split by rows, 24 -> 13 us a step.
constexpr int64_t kRowSplitMinRows = 4;
constexpr int64_t kRowSplitCopies = 2;

// A core's L2 where sysconf does not say.
constexpr int64_t kDefaultL2Bytes = int64_t{1} << 20;

// Bytes of W^T above which a single row's product sweeps W^T's rows in order, which the
// prefetchers follow, rather than a block of columns at a time down all of K (a strided walk
// they do not): a batch of one at wide sizes is bound by reading W. (The figure that set it was
// not recorded; it is a quarter of kDefaultL2Bytes.)
constexpr int64_t kSweepBytes = int64_t{1} << 18;

// Bytes of columns in one packed panel of a weight: two AVX-512 registers, four AVX2 ones.
constexpr int64_t kPanelBytes = 128;

// Elements of W^T from which a batch-of-one call packs it with ATen's blocked transposing copy
// rather than the raw loop, which at small sizes costs less than two ATen calls.
constexpr int64_t kPackCopyElements = int64_t{1} << 16;

// Multiply-adds below which a call's products over the whole sequence are loops rather than
// ATen GEMMs: at a FusedLSTMCell step's sizes every ATen call (dispatch, transposed views,
// allocation, BLAS set-up) costs more than its arithmetic, and the backward made a dozen of
// them. The input projection's loop sums over I, which does not vectorise: it gives way to BLAS
// early (measured: 25 % slower than MKL at 799 x 16 x 5, seed-chars). The gradients' loops
// vectorise over I and H.
constexpr int64_t kSmallProjection = int64_t{1} << 12;
constexpr int64_t kSmallGrads = int64_t{1} << 16;

// Multiply-adds from which a float32 CPU product with contiguous operands (the input projection,
// grad_input) goes to oneDNN's matmul rather than to ATen's GEMM (MKL); the weight gradients
// stay on ATen's GEMM, which reads their transposed operands in place (cpu/gemm_routing.h,
// CpuProducts::weight). On an AMD EPYC with AVX2 only (Zen 3) the two libraries run the same speed.
// On the AMD EPYC machine with AVX-512 of benchmarks/HISTORY.md ("After routing large float32
// products to oneDNN") MKL runs its AVX2 code (about 170 GFLOP/s on two cores) where oneDNN
// uses AVX-512 (about 380): at medium's sizes 8.9 against 19.6 ms for the input projection
// (6400 x 256 x 1024), 15.6 against 32.7 for grad_input, 19.1 against 21.3 for grad_w_ih; 0.16
// against 0.30 ms at 1600 x 64 x 256; even at 200 x 64 x 256.
constexpr int64_t kOneDnnWork = int64_t{1} << 20;

// Columns below which a product over the sequence is computed transposed: MKL is several times
// slower when the product has a handful of columns than at its transpose (measured: 260 us for
// (2000 x 80) @ (80 x 4), 60 us for the transposed product and the copy back); from about 64
// columns on the two are equal.
constexpr int64_t kNarrowColumns = 32;

// The cache of packed weights (cpu/pack_cache.h; docs/cpu.md, "Packed weights kept across calls").
// kPackCacheBytes bounds the bytes of the packs it holds, least recently used evicted first: the
// recurrent weights of four layer-directions of H = 1024 in float32 (a W_hh^T pack is 16 MiB
// each), or both the forward's and the backward's packs of two. The bound is memory held beyond
// the weights themselves, so it is kept to a small multiple of a large model's W_hh; a model
// whose packs do not fit repacks as it did before the cache, and its steps are large enough
// that a pack costs about one step. FUSED_LSTM_PACK_CACHE_BYTES overrides it (0: off).
constexpr int64_t kPackCacheBytes = int64_t{64} << 20;
// Packs smaller than this are built at every call rather than looked up (a lock, a scan of the
// entries, a checksum of the weight). Not set by a sweep: the seeds' H = 4 packs (256 bytes)
// stay below it; at H = 20 (6.4 KiB packs, cached) run.py's cell-B1, a FusedLSTMCell step per
// call at B = 1, ran the same with the cache on and off within the noise (Intel Xeon, 1 thread,
// on / off 0.96 inference, 1.03 training), cell-B8 faster with it (0.86, 0.92).
constexpr int64_t kPackCacheMinBytes = int64_t{1} << 12;
// Entries (packs, and weights seen once) held at most: bounds the scan of a lookup, and what
// weights seen once and freed since (swept at every lookup) can pin.
constexpr int64_t kPackCacheEntries = 256;

}  // namespace fused_lstm::tuning
