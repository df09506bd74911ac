// Packed weights kept across calls (docs/cpu.md, "Packed weights kept across calls"): a
// process-wide cache, bounded in bytes, of what the CPU kernels derive from a weight tensor
// alone (W_hh^T in panels, the float copy of a half or bfloat16 weight), keyed on the weight's
// identity, storage, geometry and version counter, so that a later call with unchanged weights
// reuses it rather than building it again.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace fused_lstm {

// What the cache holds now (dead entries swept first) and has done since load or the last clear.
struct PackCacheStats {
  int64_t entries = 0;   // keys held: packs, and weights seen once (no pack yet)
  int64_t packs = 0;     // entries holding a pack
  int64_t bytes = 0;     // bytes of those packs
  int64_t capacity = 0;  // the bound on bytes (0: the cache is off)
  int64_t hits = 0, misses = 0, stores = 0, evictions = 0;
};

PackCacheStats pack_cache_stats();

// Drops every entry and zeroes the counters. Packs in use by a running call stay alive until it
// ends (the call holds its own reference).
void pack_cache_clear();

// Sets the bound on the packs' bytes (0 turns the cache off and empties it), evicting what no
// longer fits. A one-step call's path depends on it (pack_cache::eligible): set it before the
// calls whose results are compared.
void pack_cache_set_capacity(int64_t bytes);

namespace pack_cache {

// What a pack of a weight is: the caller's layout code and its parameters, and the pack's dtype.
// Two packs of the same weight contents with equal kinds are equal.
struct Kind {
  int64_t layout = 0, a = 0, b = 0;
  at::ScalarType dtype = at::kFloat;
  bool operator==(const Kind&) const = default;
};

// Whether packs of `source` `bytes` large go through the cache: the cache on, source a
// contiguous CPU tensor with storage and a version counter (not an inference tensor), and bytes
// within [tuning::kPackCacheMinBytes, capacity]. A function of the call alone, never of the cache's
// history, so that a kernel may choose its path by it and two identical calls stay bitwise equal.
bool eligible(const at::Tensor& source, int64_t bytes);

// The pack of `source` for `kind`: the cached one where source is the tensor it was built from,
// with the same storage, data pointer, geometry and version, and the same checksum of its bytes
// (which writes through `.data` change: they bump no version counter the weight shares); else
// build()'s result. A pack is stored the second time the same source, version and kind is
// asked for (the first time only the sighting is kept), so that a tensor used once (a
// weight_drop product, an autocast copy, a weight an optimizer steps between calls) never holds
// a pack beyond its call. The returned tensor must never be written.
at::Tensor get(const at::Tensor& source, const Kind& kind, int64_t bytes,
               const std::function<at::Tensor()>& build);

}  // namespace pack_cache
}  // namespace fused_lstm
