// The cache of packed weights: pack_cache.h, and docs/cpu.md ("Packed weights kept across calls").
#include "pack_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../tuning.h"

namespace fused_lstm {
namespace {

using namespace tuning;
using pack_cache::Kind;

// The bound on the packs' bytes: FUSED_LSTM_PACK_CACHE_BYTES where set (0 turns the cache off),
// else tuning::kPackCacheBytes, until pack_cache_set_capacity sets it.
int64_t capacity_from_env() {
  const char* env = std::getenv("FUSED_LSTM_PACK_CACHE_BYTES");
  if (env == nullptr || *env == '\0') return kPackCacheBytes;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && v >= 0,
              "fused_lstm: FUSED_LSTM_PACK_CACHE_BYTES must be a number of bytes >= 0 (0 turns "
              "the cache of packed weights off), got '",
              env, "'");
  return static_cast<int64_t>(v);
}

std::atomic<int64_t>& capacity_slot() {
  static std::atomic<int64_t> bytes{capacity_from_env()};
  return bytes;
}

int64_t capacity() { return capacity_slot().load(std::memory_order_relaxed); }

// Elements of a source compared, on each hit, with their values when its pack was built: a
// write that bypassed the version counter (through `.data`, as a Polyak update of a target
// network does) changes nearly every element, and one of these then tells. A write to a few
// elements through `.data` can still go unseen (docs/cpu.md).
constexpr int64_t kSampleElements = 32;

// Calls f(i, address) for each sampled element of t, evenly spread over its elements in
// logical order, until f returns false; returns whether none did.
template <typename F>
bool each_sampled(const at::Tensor& t, const F& f) {
  const int64_t n = t.numel(), item = static_cast<int64_t>(t.element_size());
  const int64_t count = std::min(n, kSampleElements);
  const auto* base = static_cast<const uint8_t*>(t.const_data_ptr());
  const auto sizes = t.sizes(), strides = t.strides();
  for (int64_t i = 0; i < count; ++i) {
    int64_t idx = count > 1 ? i * (n - 1) / (count - 1) : 0, off = 0;
    for (int64_t d = t.dim() - 1; d >= 0; --d) {
      off += idx % sizes[d] * strides[d];
      idx /= sizes[d];
    }
    if (!f(i * item, base + off * item)) return false;
  }
  return true;
}

// The bytes of t's sampled elements.
std::vector<uint8_t> sample_of(const at::Tensor& t) {
  const size_t item = t.element_size();
  std::vector<uint8_t> out(static_cast<size_t>(std::min(t.numel(), kSampleElements)) * item);
  each_sampled(t, [&](int64_t at, const uint8_t* p) {
    std::memcpy(out.data() + at, p, item);
    return true;
  });
  return out;
}

struct Entry {
  const c10::TensorImpl* key;                  // pinned by `impl`: no other tensor takes its address
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  uint32_t version;
  Kind kind;
  std::vector<uint8_t> sample;
  at::Tensor pack;  // undefined while the source has been seen once at this version
  int64_t bytes = 0;
  uint64_t last_use = 0;

  Entry(const at::Tensor& t, const Kind& k)
      : key(t.unsafeGetTensorImpl()),
        impl(t.getIntrusivePtr()),
        storage(t.storage().getWeakStorageImpl()),
        data(t.storage().data()),
        offset(t.storage_offset()),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        dtype(t.scalar_type()),
        version(t.unsafeGetTensorImpl()->version_counter().current_version()),
        kind(k),
        sample(sample_of(t)) {}

  // Whether t is still the tensor this entry was made from, unchanged since.
  bool describes(const at::Tensor& t) const {
    const c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
    return storage._unsafe_get_target() == s && !storage.expired() && t.storage().data() == data &&
           t.storage_offset() == offset && t.sizes() == at::IntArrayRef(sizes) &&
           t.strides() == at::IntArrayRef(strides) && t.scalar_type() == dtype &&
           t.unsafeGetTensorImpl()->version_counter().current_version() == version &&
           each_sampled(t, [&, item = t.element_size()](int64_t at, const uint8_t* p) {
             return std::memcmp(sample.data() + at, p, item) == 0;
           });
  }
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  int64_t bytes = 0;
  uint64_t tick = 0;
  PackCacheStats counts;

  // Entries whose source was freed go, and their packs with them.
  void sweep() {
    for (size_t i = 0; i < entries.size();) {
      if (entries[i].impl.expired()) {
        erase(i);
      } else {
        ++i;
      }
    }
  }

  void erase(size_t i) {
    bytes -= entries[i].bytes;
    if (i + 1 != entries.size()) entries[i] = std::move(entries.back());
    entries.pop_back();
  }

  Entry* find(const at::Tensor& t, const Kind& kind) {
    const c10::TensorImpl* key = t.unsafeGetTensorImpl();
    for (Entry& e : entries) {
      if (e.key == key && e.kind == kind) return &e;
    }
    return nullptr;
  }

  // Least recently used first, other than `keep`, until the packs fit the capacity and the
  // entries their bound.
  void evict(const Entry* keep) {
    while (true) {
      const bool over_bytes = bytes > capacity(),
                 over_count = static_cast<int64_t>(entries.size()) > kPackCacheEntries;
      if (!over_bytes && !over_count) return;
      size_t victim = entries.size();
      for (size_t i = 0; i < entries.size(); ++i) {
        if (&entries[i] == keep || (over_bytes && !over_count && !entries[i].pack.defined())) {
          continue;
        }
        if (victim == entries.size() || entries[i].last_use < entries[victim].last_use) victim = i;
      }
      if (victim == entries.size()) return;
      ++counts.evictions;
      // erase() moves the last entry into the victim's place: keep follows it.
      const bool keep_moves = keep == &entries.back();
      erase(victim);
      if (keep_moves) keep = &entries[victim];
    }
  }
};

Cache& cache() {
  // Never destroyed: packs freed after the allocator at exit would crash it.
  static Cache* c = new Cache;
  return *c;
}

}  // namespace

PackCacheStats pack_cache_stats() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  c.sweep();
  PackCacheStats s = c.counts;
  s.entries = static_cast<int64_t>(c.entries.size());
  s.packs = std::count_if(c.entries.begin(), c.entries.end(),
                          [](const Entry& e) { return e.pack.defined(); });
  s.bytes = c.bytes;
  s.capacity = capacity();
  return s;
}

void pack_cache_clear() {
  Cache& c = cache();
  std::vector<Entry> dropped;  // freed after the lock is released
  const std::lock_guard<std::mutex> lock(c.mutex);
  dropped.swap(c.entries);
  c.bytes = 0;
  c.counts = {};
}

void pack_cache_set_capacity(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fused_lstm: the pack cache's capacity must be >= 0 bytes, got ", bytes);
  Cache& c = cache();
  std::vector<Entry> dropped;
  const std::lock_guard<std::mutex> lock(c.mutex);
  capacity_slot().store(bytes, std::memory_order_relaxed);
  if (bytes == 0) {
    dropped.swap(c.entries);
    c.bytes = 0;
  } else {
    c.evict(nullptr);
  }
}

namespace pack_cache {

bool eligible(const at::Tensor& source, int64_t bytes) {
  const int64_t cap = capacity();
  return cap > 0 && bytes >= kPackCacheMinBytes && bytes <= cap && source.defined() &&
         source.layout() == at::kStrided && source.device().is_cpu() && source.has_storage() &&
         !source.is_inference() && source.unsafeGetTensorImpl()->version_counter().enabled();
}

at::Tensor get(const at::Tensor& source, const Kind& kind, int64_t bytes,
               const std::function<at::Tensor()>& build) {
  if (!eligible(source, bytes)) return build();
  Cache& c = cache();
  std::vector<Entry> dropped;  // packs released outside the lock
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    c.sweep();
    if (Entry* e = c.find(source, kind); e != nullptr && e->pack.defined() && e->describes(source)) {
      ++c.counts.hits;
      e->last_use = ++c.tick;
      return e->pack;
    }
    ++c.counts.misses;
  }
  // Built outside the lock: another thread may build the same pack meanwhile; the later store wins.
  at::Tensor pack = build();
  const std::lock_guard<std::mutex> lock(c.mutex);
  Entry* e = c.find(source, kind);
  if (e != nullptr && e->describes(source)) {
    if (!e->pack.defined()) {  // the second sighting: keep the pack
      e->pack = pack;
      e->bytes = static_cast<int64_t>(pack.storage().nbytes());
      c.bytes += e->bytes;
      ++c.counts.stores;
    }
  } else if (e != nullptr) {  // stale: the source changed since; a sighting of what it is now
    c.bytes -= e->bytes;
    Entry fresh(source, kind);
    std::swap(*e, fresh);
    dropped.push_back(std::move(fresh));
  } else {
    c.entries.emplace_back(source, kind);
    e = &c.entries.back();
  }
  e->last_use = ++c.tick;
  c.evict(e);
  return pack;
}

}  // namespace pack_cache
}  // namespace fused_lstm
