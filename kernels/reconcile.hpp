// SPDX-License-Identifier: Apache-2.0
//
// Overlap reconciliation kernel bodies: (label_a, label_b) pair counting,
// union-find with minimum-id representatives, in-place relabelling.
//
// Header-only C++17, no Python, no I/O, no exceptions.  Labels are unsigned
// integers (uint32 or uint64); arrays are flat C-order spans (the label
// arrays may have any ndim: only the flat order matters here).
//
//   * count_pairs_range: counts every (a[i], b[i]) over i in [begin, end)
//     into a PairCounter (one per thread).  Runs of identical consecutive
//     pairs (the common case in label volumes) cost one update per run; the
//     counter hashes while pairs repeat and otherwise collects runs for a
//     radix sort.  finish_counts merges the counters into the distinct pairs
//     sorted lexicographically.
//   * union_find_min: connected components of an edge list; the
//     representative of a component is its minimum id.
//   * relabel_range / relabel_one: labels[i] := values[j] where keys[j] ==
//     labels[i], unchanged where no key matches.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace ffn {
namespace kernels {
namespace reconcile {

/// 64-bit finaliser (from the MurmurHash3 family): a cheap, well-mixing hash.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

/// Open-addressing (linear probing) map (a, b) -> count.  count == 0 marks an
/// empty slot; stored counts are always >= 1.
class PairCountMap {
 public:
  struct Slot {
    uint64_t a;
    uint64_t b;
    int64_t count;
  };

  explicit PairCountMap(size_t capacity_pow2 = 1024) { reset(capacity_pow2); }

  void reset(size_t capacity_pow2) {
    size_t cap = 16;
    while (cap < capacity_pow2) cap <<= 1;
    slots_.assign(cap, Slot{0, 0, 0});
    mask_ = cap - 1;
    size_ = 0;
  }

  size_t size() const { return size_; }
  const std::vector<Slot>& slots() const { return slots_; }

  void add(uint64_t a, uint64_t b, int64_t n) {
    size_t i = static_cast<size_t>(hash(a, b)) & mask_;
    for (;;) {
      Slot& s = slots_[i];
      if (s.count == 0) {
        s.a = a;
        s.b = b;
        s.count = n;
        if (++size_ * 2 > slots_.size()) grow();
        return;
      }
      if (s.a == a && s.b == b) {
        s.count += n;
        return;
      }
      i = (i + 1) & mask_;
    }
  }

  /// Add every entry of another map.
  void merge(const PairCountMap& other) {
    for (const Slot& s : other.slots_)
      if (s.count != 0) add(s.a, s.b, s.count);
  }

  /// Entries sorted lexicographically by (a, b).
  std::vector<Slot> sorted_entries() const {
    std::vector<Slot> out;
    out.reserve(size_);
    for (const Slot& s : slots_)
      if (s.count != 0) out.push_back(s);
    std::sort(out.begin(), out.end(), [](const Slot& x, const Slot& y) {
      return x.a < y.a || (x.a == y.a && x.b < y.b);
    });
    return out;
  }

 private:
  // Multiply-xor hash (cheap; the probe loop compares full keys anyway).
  static uint64_t hash(uint64_t a, uint64_t b) {
    const uint64_t h = (a * 0x9E3779B97F4A7C15ULL) ^ (b * 0xC2B2AE3D27D4EB4FULL);
    return h ^ (h >> 32);
  }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.size() * 2, Slot{0, 0, 0});
    mask_ = slots_.size() - 1;
    size_ = 0;
    for (const Slot& s : old)
      if (s.count != 0) add(s.a, s.b, s.count);
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

using PairEntry = PairCountMap::Slot;

/// (key, count) with key = a << 32 | b, for labels below 2^32.
struct KeyCount {
  uint64_t key;
  int64_t count;
};

/// Pair counter of one thread: a cache-sized hash map while the pairs repeat
/// (the usual case: two segmentations of the same objects overlap in few
/// distinct pairs).  When the map passes `max_map_entries` distinct pairs, or
/// holds more than 4096 of them while runs rarely repeat a pair (fewer than 4
/// runs per distinct pair so far), a hash map would mostly miss the caches
/// without merging much, so the counter switches to an append-only list of
/// runs that is radix-sorted at the end (16-byte (a << 32 | b, count) records
/// while every label fits in 32 bits, 24-byte (a, b, count) records otherwise).
class PairCounter {
 public:
  /// max_runs: an upper bound of the runs this counter will see (the length
  /// of its voxel range), used to size the run list once when it spills.
  explicit PairCounter(size_t max_runs = 0, size_t max_map_entries = size_t(1) << 15)
      : map_(1024), max_entries_(max_map_entries), max_runs_(max_runs) {}

  void add(uint64_t a, uint64_t b, int64_t n) {
    if (!spilled_) {
      map_.add(a, b, n);
      ++runs_;
      const size_t m = map_.size();
      if (m > 4096 && (m > max_entries_ || 4 * m > runs_)) spill();
    } else if (!wide_ && ((a | b) >> 32) == 0) {
      narrow_.push_back(KeyCount{(a << 32) | b, n});
    } else {
      if (!wide_) widen();
      wide_runs_.push_back(PairEntry{a, b, n});
    }
  }

  bool spilled() const { return spilled_; }
  bool wide() const { return wide_; }
  PairCountMap& map() { return map_; }
  const std::vector<KeyCount>& narrow_runs() const { return narrow_; }
  std::vector<KeyCount>& narrow_runs() { return narrow_; }
  const std::vector<PairEntry>& wide_runs() const { return wide_runs_; }

  /// Switch the run list to 24-byte records.
  void widen() {
    wide_ = true;
    wide_runs_.reserve(narrow_.size());
    for (const KeyCount& e : narrow_)
      wide_runs_.push_back(PairEntry{e.key >> 32, e.key & 0xFFFFFFFFULL, e.count});
    std::vector<KeyCount>().swap(narrow_);
  }

 private:
  void spill() {
    spilled_ = true;
    if (max_runs_ > 0) narrow_.reserve(max_runs_);  // no regrowth copies
    uint64_t hi = 0;
    for (const PairEntry& s : map_.slots())
      if (s.count != 0) hi |= s.a | s.b;
    wide_ = (hi >> 32) != 0;
    for (const PairEntry& s : map_.slots()) {
      if (s.count == 0) continue;
      if (wide_)
        wide_runs_.push_back(s);
      else
        narrow_.push_back(KeyCount{(s.a << 32) | s.b, s.count});
    }
    map_.reset(16);
  }

  PairCountMap map_;
  std::vector<KeyCount> narrow_;
  std::vector<PairEntry> wide_runs_;
  size_t max_entries_;
  size_t max_runs_;
  size_t runs_ = 0;
  bool spilled_ = false;
  bool wide_ = false;
};

/// Stable LSD radix sort by key, over the low `bits` bits only (keys must be
/// < 2^bits), in the fewest passes of at most 11-bit digits.
inline void radix_sort(std::vector<KeyCount>& v, int bits) {
  const size_t n = v.size();
  if (n < 2 || bits <= 0) return;
  const int passes = (bits + 10) / 11;
  const int width = (bits + passes - 1) / passes;
  const size_t buckets = size_t(1) << width;
  const uint64_t mask = buckets - 1;
  std::vector<size_t> hist(static_cast<size_t>(passes) * buckets, 0);
  for (const KeyCount& e : v)
    for (int d = 0; d < passes; ++d) ++hist[d * buckets + ((e.key >> (width * d)) & mask)];
  std::vector<KeyCount> tmp(n);
  KeyCount* src = v.data();
  KeyCount* dst = tmp.data();
  for (int d = 0; d < passes; ++d) {
    size_t* h = hist.data() + d * buckets;
    bool constant = false;
    for (size_t i = 0; i < buckets; ++i)
      if (h[i] == n) constant = true;
    if (constant) continue;  // this digit is the same in every key
    size_t sum = 0;
    for (size_t i = 0; i < buckets; ++i) {
      const size_t c = h[i];
      h[i] = sum;
      sum += c;
    }
    const int shift = width * d;
    for (size_t i = 0; i < n; ++i) dst[h[(src[i].key >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != v.data()) std::copy(src, src + n, v.data());
}

/// Sort (a << 32 | b, count) records by (a, b) and merge equal pairs.  The keys
/// are first repacked as a * (max_b + 1) + b (same order, fewer bits, so fewer
/// radix passes when the ids are small).
inline std::vector<PairEntry> sort_reduce_narrow(std::vector<KeyCount>& all) {
  uint64_t max_a = 0, max_b = 0;
  for (const KeyCount& e : all) {
    max_a = std::max<uint64_t>(max_a, e.key >> 32);
    max_b = std::max<uint64_t>(max_b, e.key & 0xFFFFFFFFULL);
  }
  const uint64_t nb = max_b + 1;  // (max_a + 1) * nb <= 2^64 always holds here
  for (KeyCount& e : all) e.key = (e.key >> 32) * nb + (e.key & 0xFFFFFFFFULL);
  const uint64_t top = max_a * nb + max_b;
  int bits = 0;
  while (bits < 64 && (top >> bits) != 0) ++bits;
  radix_sort(all, bits);
  size_t distinct = all.empty() ? 0 : 1;
  for (size_t i = 1; i < all.size(); ++i) distinct += all[i].key != all[i - 1].key;
  std::vector<PairEntry> out;
  out.reserve(distinct);
  uint64_t last = 0;
  for (const KeyCount& e : all) {
    if (!out.empty() && e.key == last) {
      out.back().count += e.count;
    } else {
      last = e.key;
      out.push_back(PairEntry{e.key / nb, e.key % nb, e.count});
    }
  }
  return out;
}

/// Combine the per-thread counters into the distinct pairs sorted
/// lexicographically by (a, b).
inline std::vector<PairEntry> finish_counts(std::vector<PairCounter>& counters) {
  bool spilled = false, wide = false;
  for (PairCounter& c : counters) {
    spilled = spilled || c.spilled();
    wide = wide || c.wide();
  }
  if (!spilled) {
    for (size_t i = 1; i < counters.size(); ++i) counters[0].map().merge(counters[i].map());
    return counters[0].map().sorted_entries();
  }
  std::vector<PairEntry> out;
  if (!wide) {  // every label < 2^32: radix sort the 64-bit keys
    uint64_t hi = 0;
    for (PairCounter& c : counters)
      for (const PairEntry& s : c.map().slots())
        if (s.count != 0) hi |= s.a | s.b;
    wide = (hi >> 32) != 0;
  }
  if (!wide) {
    size_t total = 0;
    for (PairCounter& c : counters) total += c.narrow_runs().size() + c.map().size();
    // Reuse the largest run list as the destination (no copy of it).
    size_t big = 0;
    for (size_t i = 1; i < counters.size(); ++i)
      if (counters[i].narrow_runs().capacity() > counters[big].narrow_runs().capacity()) big = i;
    std::vector<KeyCount> all;
    all.swap(counters[big].narrow_runs());
    all.reserve(total);
    for (size_t i = 0; i < counters.size(); ++i) {
      PairCounter& c = counters[i];
      if (i != big) all.insert(all.end(), c.narrow_runs().begin(), c.narrow_runs().end());
      for (const PairEntry& s : c.map().slots())
        if (s.count != 0) all.push_back(KeyCount{(s.a << 32) | s.b, s.count});
    }
    return sort_reduce_narrow(all);
  }
  std::vector<PairEntry> all;
  for (PairCounter& c : counters) {
    if (!c.wide()) c.widen();
    all.insert(all.end(), c.wide_runs().begin(), c.wide_runs().end());
    for (const PairEntry& s : c.map().slots())
      if (s.count != 0) all.push_back(s);
  }
  std::sort(all.begin(), all.end(), [](const PairEntry& x, const PairEntry& y) {
    return x.a < y.a || (x.a == y.a && x.b < y.b);
  });
  for (const PairEntry& e : all) {
    if (!out.empty() && out.back().a == e.a && out.back().b == e.b)
      out.back().count += e.count;
    else
      out.push_back(e);
  }
  return out;
}

/// Count the pairs (a[i], b[i]) for begin <= i < end into `counter`.
/// ignore_zero: skip pairs where either label is 0.
///
/// Run boundaries are first collected branch-free per block of voxels (a
/// data-dependent branch per voxel would mispredict at most run ends), then
/// each run costs one counter update.
template <class TA, class TB, class Counter>
inline void count_pairs_range(const TA* a, const TB* b, int64_t begin, int64_t end,
                              bool ignore_zero, Counter& map) {
  if (begin >= end) return;
  constexpr int64_t kBlock = 4096;
  int32_t starts[kBlock];
  int64_t run_start = begin;
  auto emit = [&](int64_t p, int64_t len) {
    const TA va = a[p];
    const TB vb = b[p];
    if (!(ignore_zero && (va == 0 || vb == 0))) map.add(va, vb, len);
  };
  for (int64_t s = begin + 1; s < end; s += kBlock) {
    const int64_t e = (end - s < kBlock) ? end : s + kBlock;
    int64_t k = 0;
    for (int64_t i = s; i < e; ++i) {
      starts[k] = static_cast<int32_t>(i - s);
      k += static_cast<int64_t>((a[i] != a[i - 1]) | (b[i] != b[i - 1]));
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = s + starts[j];
      emit(run_start, i - run_start);
      run_start = i;
    }
  }
  emit(run_start, end - run_start);
}

/// Union-find over `m` edges (2*m uint64 values, row-major (m, 2)).
/// Fills `ids` with the sorted distinct ids of the edges and `roots` with,
/// for each id, the minimum id of its connected component.
inline void union_find_min(const uint64_t* edges, int64_t m, std::vector<uint64_t>& ids,
                           std::vector<uint64_t>& roots) {
  ids.assign(edges, edges + 2 * m);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<int64_t> parent(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) parent[i] = i;
  auto find = [&parent](int64_t x) {
    while (parent[x] != x) {
      parent[x] = parent[parent[x]];  // path halving
      x = parent[x];
    }
    return x;
  };
  auto index_of = [&ids](uint64_t v) {
    return static_cast<int64_t>(std::lower_bound(ids.begin(), ids.end(), v) - ids.begin());
  };
  for (int64_t e = 0; e < m; ++e) {
    const int64_t ra = find(index_of(edges[2 * e]));
    const int64_t rb = find(index_of(edges[2 * e + 1]));
    // ids are sorted, so the smaller index is the smaller id: the root of a
    // component is always its minimum id.
    if (ra < rb)
      parent[rb] = ra;
    else if (rb < ra)
      parent[ra] = rb;
  }
  roots.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) roots[i] = ids[find(i)];
}

/// Device-friendly single-voxel relabel: binary search in sorted `keys`.
template <class L>
inline L relabel_one(L v, const uint64_t* keys, const uint64_t* values, int64_t n) {
  int64_t lo = 0, hi = n;
  const uint64_t key = static_cast<uint64_t>(v);
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return (lo < n && keys[lo] == key) ? static_cast<L>(values[lo]) : v;
}

/// Open-addressing map uint64 key -> uint64 value built once from sorted
/// unique keys (used by the CPU relabel).
class KeyValueMap {
 public:
  KeyValueMap(const uint64_t* keys, const uint64_t* values, int64_t n) {
    size_t cap = 16;
    while (cap < static_cast<size_t>(n) * 2 + 1) cap <<= 1;
    keys_.assign(cap, 0);
    values_.assign(cap, 0);
    used_.assign(cap, 0);
    mask_ = cap - 1;
    for (int64_t i = 0; i < n; ++i) {
      size_t j = static_cast<size_t>(mix64(keys[i])) & mask_;
      while (used_[j]) j = (j + 1) & mask_;
      used_[j] = 1;
      keys_[j] = keys[i];
      values_[j] = values[i];
    }
  }

  /// Whether `key` is present; writes its value.
  bool find(uint64_t key, uint64_t* value) const {
    size_t j = static_cast<size_t>(mix64(key)) & mask_;
    while (used_[j]) {
      if (keys_[j] == key) {
        *value = values_[j];
        return true;
      }
      j = (j + 1) & mask_;
    }
    return false;
  }

 private:
  std::vector<uint64_t> keys_;
  std::vector<uint64_t> values_;
  std::vector<uint8_t> used_;
  size_t mask_ = 0;
};

/// Relabel labels[begin:end) in place through `map`.  A one-entry cache
/// handles runs of equal labels without a lookup.
template <class L>
inline void relabel_range(L* labels, int64_t begin, int64_t end, const KeyValueMap& map) {
  if (begin >= end) return;
  L last_in = labels[begin];
  uint64_t mapped = 0;
  L last_out = map.find(last_in, &mapped) ? static_cast<L>(mapped) : last_in;
  for (int64_t i = begin; i < end; ++i) {
    const L v = labels[i];
    if (v != last_in) {
      last_in = v;
      last_out = map.find(v, &mapped) ? static_cast<L>(mapped) : v;
    }
    labels[i] = last_out;
  }
}

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
