// The cache of packed weights: pack_cache.h, and docs/cpu.md ("Packed weights kept across calls").
#include "pack_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "../tuning.h"
#include "isa.h"

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

// A checksum of a contiguous tensor's bytes, compared on each hit: writes that bypass the version
// counter (through `.data`: a Polyak update of a target network, gradcheck's perturbation of
// one element at a time) change it. Fletcher's two running sums over 64-bit words, in kLanes
// interleaved lanes (each lane's pair kept, not folded into one number): a change confined to
// one word always changes its lane's first sum; changes to several words escape only where
// they cancel in both sums of every lane (as integers mod 2^64). One read of the weight: a
// small part of building the pack, which also writes it in another order.
constexpr int kLanes = 8;
using Checksum = std::array<uint64_t, 2 * kLanes>;

// The two sums of every lane over `blocks` blocks of kLanes words, in the process's ISA
// (isa.h): one AVX-512 register per sum, where the baseline build ran at a third of the speed.
struct ChecksumBlocks {
  template <CpuIsa>
  static FL_ISA_BODY void run(const uint8_t* p, size_t blocks, uint64_t* a_out, uint64_t* b_out) {
    uint64_t a[kLanes], b[kLanes];
    std::memcpy(a, a_out, sizeof a);
    std::memcpy(b, b_out, sizeof b);
    for (size_t i = 0; i < blocks; ++i) {
      uint64_t w[kLanes];
      std::memcpy(w, p + i * sizeof w, sizeof w);
      for (int l = 0; l < kLanes; ++l) {
        a[l] += w[l];
        b[l] += a[l];
      }
    }
    std::memcpy(a_out, a, sizeof a);
    std::memcpy(b_out, b, sizeof b);
  }
};

Checksum checksum(const at::Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.const_data_ptr());
  const size_t n = t.nbytes(), words = n / 8, blocks = words / kLanes;
  uint64_t a[kLanes] = {}, b[kLanes] = {};
  run_on_cpu_isa<ChecksumBlocks>(p, blocks, &a[0], &b[0]);
  size_t i = blocks * kLanes;
  for (int l = 0; i < words; ++i, ++l) {
    uint64_t w;
    std::memcpy(&w, p + i * 8, 8);
    a[l] += w;
    b[l] += a[l];
  }
  if (n % 8 != 0) {  // the last bytes, zero-padded to a word
    uint64_t w = 0;
    std::memcpy(&w, p + words * 8, n % 8);
    a[0] += w;
    b[0] += a[0];
  }
  Checksum out;
  for (int l = 0; l < kLanes; ++l) out[l] = a[l], out[kLanes + l] = b[l];
  return out;
}

struct Entry {
  const c10::TensorImpl* key;  // pinned by `impl`: no other tensor takes its address
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  uint32_t version;
  Kind kind;
  Checksum sum;
  at::Tensor pack;  // undefined while the source has been seen once at this version
  int64_t bytes = 0;
  uint64_t last_use = 0;

  Entry(const at::Tensor& t, const Kind& k, const Checksum& s)
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
        sum(s) {}

  // Whether t, whose checksum is t_sum, is still the tensor this entry was made from, unchanged.
  bool describes(const at::Tensor& t, const Checksum& t_sum) const {
    const c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
    return storage._unsafe_get_target() == s && !storage.expired() && t.storage().data() == data &&
           t.storage_offset() == offset && t.sizes() == at::IntArrayRef(sizes) &&
           t.strides() == at::IntArrayRef(strides) && t.scalar_type() == dtype &&
           t.unsafeGetTensorImpl()->version_counter().current_version() == version && sum == t_sum;
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
         source.is_contiguous() && !source.is_inference() &&
         source.unsafeGetTensorImpl()->version_counter().enabled();
}

at::Tensor get(const at::Tensor& source, const Kind& kind, int64_t bytes,
               const std::function<at::Tensor()>& build) {
  if (!eligible(source, bytes)) return build();
  const Checksum sum = checksum(source);  // outside the lock: one read of the weight
  Cache& c = cache();
  std::vector<Entry> dropped;  // packs released outside the lock
  {
    const std::lock_guard<std::mutex> lock(c.mutex);
    c.sweep();
    if (Entry* e = c.find(source, kind);
        e != nullptr && e->pack.defined() && e->describes(source, sum)) {
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
  if (e != nullptr && e->describes(source, sum)) {
    if (!e->pack.defined()) {  // the second sighting: keep the pack
      e->pack = pack;
      e->bytes = static_cast<int64_t>(pack.storage().nbytes());
      c.bytes += e->bytes;
      ++c.counts.stores;
    }
  } else if (e != nullptr) {  // stale: the source changed since; a sighting of what it is now
    c.bytes -= e->bytes;
    Entry fresh(source, kind, sum);
    std::swap(*e, fresh);
    dropped.push_back(std::move(fresh));
  } else {
    c.entries.emplace_back(source, kind, sum);
    e = &c.entries.back();
  }
  e->last_use = ++c.tick;
  c.evict(e);
  return pack;
}

}  // namespace pack_cache
}  // namespace fused_lstm
