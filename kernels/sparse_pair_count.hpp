// SPDX-License-Identifier: Apache-2.0
//
// Sparse pair counting for count_pairs (count_pairs.hpp): the fallback of a
// PairCounter whose labels are too many for its dense matrix, and the
// (a, b, count) record of every count_pairs result.
//
//   * PairCountMap: open-addressing (linear probing) hash map (a, b) -> count,
//     load at most 1/2, doubling.  Its Slot is PairEntry, the result record.
//   * SparsePairCounter: the counter of one thread.  A cache-sized
//     PairCountMap while the pairs repeat; then (too many distinct pairs, or
//     few runs per distinct pair) an append-only list of runs: 16-byte
//     (a << 32 | b, count) records while every label fits in 32 bits, 24-byte
//     (a, b, count) records otherwise.
//   * radix_sort, sort_reduce_narrow, finish_sparse_counts: combine the
//     per-thread counters into the distinct pairs sorted lexicographically by
//     (a, b), equal pairs' counts added.  16-byte records are repacked as
//     a * (max_b + 1) + b and LSD radix-sorted (digits of at most 11 bits,
//     digits equal in every key skipped): O(R) for R runs.  24-byte records:
//     std::sort, O(R log R).
//
// Through count_pairs, the result must agree exactly with
// floodfilling.kernels_reference.count_pairs_reference (np.unique); the tests
// reach this path with many distinct labels (tests/test_kernels_reconcile.py).
//
// Threading: none here.  A counter belongs to one thread at a time;
// finish_sparse_counts runs serially after the counting.
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).  Namespace ffn::kernels::reconcile, shared by the
// overlap-reconciliation family: count_pairs.hpp (with run_starts.hpp,
// dense_scratch.hpp, sparse_pair_count.hpp), union_find.hpp, relabel.hpp.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace ffn {
namespace kernels {
namespace reconcile {

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

/// Fallback pair counter of one thread, for inputs with too many distinct
/// labels for PairCounter's dense matrix: a cache-sized hash map while the
/// pairs repeat.  When the map passes `max_map_entries` distinct pairs, or
/// holds more than 4096 of them while runs rarely repeat a pair (fewer than 4
/// runs per distinct pair so far), a hash map would mostly miss the caches
/// without merging much, so the counter switches to an append-only list of
/// runs that is radix-sorted at the end (16-byte (a << 32 | b, count) records
/// while every label fits in 32 bits, 24-byte (a, b, count) records otherwise).
class SparsePairCounter {
 public:
  /// max_runs: an upper bound of the runs this counter will see (the length
  /// of its voxel range), used to size the run list once when it spills.
  explicit SparsePairCounter(size_t max_runs = 0, size_t max_map_entries = size_t(1) << 15)
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

/// Combine sparse per-thread counters into the distinct pairs sorted
/// lexicographically by (a, b).
inline std::vector<PairEntry> finish_sparse_counts(std::vector<SparsePairCounter>& counters) {
  bool spilled = false, wide = false;
  for (SparsePairCounter& c : counters) {
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
    for (SparsePairCounter& c : counters)
      for (const PairEntry& s : c.map().slots())
        if (s.count != 0) hi |= s.a | s.b;
    wide = (hi >> 32) != 0;
  }
  if (!wide) {
    size_t total = 0;
    for (SparsePairCounter& c : counters) total += c.narrow_runs().size() + c.map().size();
    // Reuse the largest run list as the destination (no copy of it).
    size_t big = 0;
    for (size_t i = 1; i < counters.size(); ++i)
      if (counters[i].narrow_runs().capacity() > counters[big].narrow_runs().capacity()) big = i;
    std::vector<KeyCount> all;
    all.swap(counters[big].narrow_runs());
    all.reserve(total);
    for (size_t i = 0; i < counters.size(); ++i) {
      SparsePairCounter& c = counters[i];
      if (i != big) all.insert(all.end(), c.narrow_runs().begin(), c.narrow_runs().end());
      for (const PairEntry& s : c.map().slots())
        if (s.count != 0) all.push_back(KeyCount{(s.a << 32) | s.b, s.count});
    }
    return sort_reduce_narrow(all);
  }
  std::vector<PairEntry> all;
  for (SparsePairCounter& c : counters) {
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

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
