// SPDX-License-Identifier: Apache-2.0
//
// Overlap reconciliation kernel bodies: (label_a, label_b) pair counting,
// union-find with minimum-id representatives, in-place relabelling.
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).
//
//   * count_pairs_range: counts every (a[i], b[i]) over i in [begin, end)
//     into a PairCounter (one per thread).  Runs of identical consecutive
//     pairs (the common case in label volumes) cost one update per run: the
//     run starts come from a (SIMD where the CPU has it) scan of a small block
//     of voxels, then each run adds its length to a dense (label of a x label
//     of b) matrix cell, labels being mapped to dense ids by a small hash
//     table.  With too many distinct labels for the matrix, the counter moves
//     to a sparse one (pair hash map, then radix-sorted run lists).
//     finish_counts merges the counters into the distinct pairs sorted
//     lexicographically.
//   * union_find_min: connected components of an edge list; the
//     representative of a component is its minimum id.
//   * relabel_range / relabel_one: labels[i] := values[j] where keys[j] ==
//     labels[i], unchanged where no key matches.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// ------------------------------------------------------------- run boundaries

/// Whether the run scan may use the SIMD version when the CPU has it (the
/// tests turn it off to check the portable one).
inline std::atomic<bool>& scan_simd_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

/// Run starts in [i0, e) (voxels whose a or b label differs from the previous
/// voxel; i0 > 0), appended to starts[k..) as offsets from s; returns the new
/// k.  Branch-free: a data-dependent branch per voxel would mispredict at most
/// run ends.
template <class TA, class TB>
inline int64_t run_starts_scalar(const TA* a, const TB* b, int64_t i0, int64_t e, int64_t s,
                                 int32_t* starts, int64_t k) {
  for (int64_t i = i0; i < e; ++i) {
    starts[k] = static_cast<int32_t>(i - s);
    k += static_cast<int64_t>((a[i] != a[i - 1]) | (b[i] != b[i - 1]));
  }
  return k;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FFN_NO_MULTIVERSIONING)
#define FFN_RECONCILE_AVX2 1

/// Bit j (0 <= j < 8): p[j] == p[j - 1].
__attribute__((target("avx2"))) inline uint32_t same8(const uint32_t* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p - 1));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(x, y))));
}

__attribute__((target("avx2"))) inline uint32_t same8(const uint64_t* p) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i y0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p - 1));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4));
  const __m256i y1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 3));
  const int m0 = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(x0, y0)));
  const int m1 = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(x1, y1)));
  return static_cast<uint32_t>(m0 | (m1 << 4));
}

/// run_starts_scalar for CPUs with AVX2 (chosen at run time): the equality
/// tests of 64 voxels make one bit mask, whose set bits are the run starts.
template <class TA, class TB>
__attribute__((target("avx2,bmi"))) __attribute__((noinline)) int64_t
run_starts_avx2(const TA* a, const TB* b, int64_t i0, int64_t e, int64_t s, int32_t* starts,
                int64_t k) {
  int64_t i = i0;
  for (; i + 64 <= e; i += 64) {
    uint64_t same = 0;
    for (int g = 0; g < 8; ++g)
      same |= static_cast<uint64_t>(same8(a + i + 8 * g) & same8(b + i + 8 * g)) << (8 * g);
    uint64_t starts_mask = ~same;
    const int32_t off = static_cast<int32_t>(i - s);
    while (starts_mask != 0) {
      starts[k++] = off + static_cast<int32_t>(__builtin_ctzll(starts_mask));
      starts_mask &= starts_mask - 1;
    }
  }
  return run_starts_scalar(a, b, i, e, s, starts, k);
}
#endif

/// Prefetch the cache line kPrefetchVoxels voxels past p (integer arithmetic:
/// the address may lie past the array; a prefetch never faults).
template <class T>
inline void prefetch_ahead(const T* p) {
  constexpr uintptr_t kPrefetchVoxels = 1024;
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchVoxels * sizeof(T)));
}

/// Dense ids 0, 1, 2, ... (in order of first appearance) for the distinct
/// labels of each of the two inputs (side 0: a, side 1: b), in one table keyed
/// by label (a label found in both inputs has one slot holding both ids):
/// open addressing with linear probing that never wraps (a spare tail of
/// slots past the table), multiplicative hashing, load at most 1/8.  find()
/// compares the home slot and the next one only, without a branch: the table
/// is kept sparse enough (it doubles when a new label would sit further, down
/// to a load of 1/16) that nearly every label sits in one of them, so the
/// per-run lookups of the caller rarely take a branch the wrong way.  get() is
/// the complete lookup / insertion (the caller's fallback when find() misses).
class LabelIds {
 public:
  static constexpr size_t kWindow = 2;

  struct Slot {
    uint64_t key;
    uint32_t id[2];  // 1 + the id of the label on each side; 0: none
  };

  LabelIds() { rehash(64); }

  /// Forget every label (keeping the table's size and memory unless large).
  void reset() {
    values_[0].clear();
    values_[1].clear();
    keys_ = 0;
    if (capacity_ > (size_t(1) << 16)) {
      std::vector<Slot>().swap(slots_);
      std::vector<uint64_t>().swap(values_[0]);
      std::vector<uint64_t>().swap(values_[1]);
      rehash(64);
    } else {
      std::fill(slots_.begin(), slots_.end(), Slot{0, {0, 0}});
    }
  }

  /// Label of each id of a side.
  const std::vector<uint64_t>& values(int side) const { return values_[side]; }
  const Slot* slots() const { return slots_.data(); }
  int shift() const { return shift_; }

  /// 1 + the id of v on `side` when v is in its home slot or the next one,
  /// else 0.
  static uint32_t find(const Slot* slots, int shift, uint64_t v, int side) {
    const Slot* p = slots + home(v, shift);
    // Empty slots hold ids 0, so a key that happens to equal v there adds 0.
    const uint32_t m0 = 0u - static_cast<uint32_t>(p[0].key == v);
    const uint32_t m1 = 0u - static_cast<uint32_t>(p[1].key == v);
    return (p[0].id[side] & m0) | (p[1].id[side] & m1);
  }

  /// Id of label v on `side`, assigning the next id of that side when new.
  uint32_t get(uint64_t v, int side) {
    for (;;) {
      const size_t h = home(v, shift_);
      size_t i = h;
      while (i < slots_.size() && used(slots_[i]) && slots_[i].key != v) ++i;
      if (i < slots_.size() && used(slots_[i])) {  // v is known (on some side)
        Slot& s = slots_[i];
        if (s.id[side] == 0) {
          s.id[side] = static_cast<uint32_t>(values_[side].size() + 1);
          values_[side].push_back(v);
        }
        return s.id[side] - 1;
      }
      // v is new: it goes to slot i.  Past the window of its home slot it
      // would take the slow path at every lookup: then double the table,
      // unless it is already sparse (at load 1/16, this leaves about 0.4% of
      // the labels there).
      if (i < slots_.size() && (i - h < kWindow || capacity_ >= 16 * (keys_ + 1))) {
        Slot& s = slots_[i];
        s.key = v;
        s.id[side] = static_cast<uint32_t>(values_[side].size() + 1);
        values_[side].push_back(v);
        const uint32_t id = s.id[side] - 1;
        if (++keys_ * 8 > capacity_) rehash(capacity_ * 2);
        return id;
      }
      rehash(capacity_ * 2);
    }
  }

 private:
  static constexpr size_t kTail = 64;

  static bool used(const Slot& s) { return (s.id[0] | s.id[1]) != 0; }

  static size_t home(uint64_t v, int shift) {
    return static_cast<size_t>((v * 0x9E3779B97F4A7C15ULL) >> shift);
  }

  void rehash(size_t cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    for (;;) {
      capacity_ = cap;
      slots_.assign(cap + kTail, Slot{0, {0, 0}});
      shift_ = 64;
      for (size_t c = cap; c > 1; c >>= 1) --shift_;
      bool ok = true;
      for (const Slot& s : old) {
        if (!used(s)) continue;
        size_t i = home(s.key, shift_);
        while (i < slots_.size() && used(slots_[i])) ++i;
        if (i == slots_.size()) {
          ok = false;
          break;
        }
        slots_[i] = s;
      }
      if (ok) return;
      cap *= 2;
    }
  }

  std::vector<Slot> slots_;
  std::vector<uint64_t> values_[2];
  size_t capacity_ = 0;
  size_t keys_ = 0;
  int shift_ = 64;
};

/// A zero-filled uint32 buffer (the dense pair matrix).  Large buffers are
/// 2 MiB aligned and, on Linux, marked for transparent huge pages: the matrix
/// is read at scattered rows, and with 4 KiB pages the first access to a row
/// (after other work has left the caches) costs a page walk from memory on top
/// of the cell's own cache miss.
class CellBuffer {
 public:
  CellBuffer() = default;
  explicit CellBuffer(size_t cells) : size_(cells) {
    const size_t bytes = (cells ? cells : 1) * sizeof(uint32_t);
    if (bytes >= kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      data_ = static_cast<uint32_t*>(std::aligned_alloc(kHuge, rounded));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (data_) madvise(data_, rounded, MADV_HUGEPAGE);
#endif
      if (data_) std::memset(data_, 0, bytes);
    } else {
      data_ = static_cast<uint32_t*>(std::calloc(1, bytes));
    }
    if (!data_) throw std::bad_alloc();
  }
  CellBuffer(CellBuffer&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  CellBuffer& operator=(CellBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  CellBuffer(const CellBuffer&) = delete;
  CellBuffer& operator=(const CellBuffer&) = delete;
  ~CellBuffer() { std::free(data_); }

  uint32_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  static constexpr size_t kHuge = size_t(1) << 21;
  uint32_t* data_ = nullptr;
  size_t size_ = 0;
};


/// Working memory of one dense counter: label table, pair matrix (all zero
/// between uses), non-zero cell list.  Kept between calls by ScratchPool:
/// fresh allocations of this size cost page faults comparable to the
/// counting itself.
struct DenseScratch {
  LabelIds ids;
  CellBuffer cells;
  std::vector<uint64_t> nonzero;
};

/// Process-wide, thread-safe pool of DenseScratch (at most kKeep of them,
/// with at most kKeepCells matrix cells (32 MiB) in all).
class ScratchPool {
 public:
  static constexpr size_t kKeep = 8;
  static constexpr size_t kKeepCells = size_t(1) << 23;

  /// A pooled scratch (the one with the largest matrix), or a new one.
  static std::unique_ptr<DenseScratch> take() {
    {
      std::lock_guard<std::mutex> lock(mutex());
      std::vector<std::unique_ptr<DenseScratch>>& p = pool();
      if (!p.empty()) {
        std::unique_ptr<DenseScratch> out = std::move(p.back());  // kept sorted by size
        p.pop_back();
        return out;
      }
    }
    return std::unique_ptr<DenseScratch>(new DenseScratch());
  }

  /// Keep a scratch whose matrix is all zero and whose table and list are
  /// empty.
  static void give(std::unique_ptr<DenseScratch> scratch) {
    if (!scratch || scratch->cells.size() > kKeepCells) return;
    std::lock_guard<std::mutex> lock(mutex());
    std::vector<std::unique_ptr<DenseScratch>>& p = pool();
    p.push_back(std::move(scratch));
    // Largest matrices last (taken first); drop the smallest past the limits.
    std::sort(p.begin(), p.end(), [](const std::unique_ptr<DenseScratch>& x,
                                     const std::unique_ptr<DenseScratch>& y) {
      return x->cells.size() < y->cells.size();
    });
    size_t total = 0, keep = 0;
    while (keep < p.size() && keep < kKeep &&
           total + p[p.size() - 1 - keep]->cells.size() <= kKeepCells)
      total += p[p.size() - 1 - keep++]->cells.size();
    p.erase(p.begin(), p.end() - static_cast<std::ptrdiff_t>(keep));
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<DenseScratch>>& pool() {
    static std::vector<std::unique_ptr<DenseScratch>> p;
    return p;
  }
};

/// Ids 0 .. n-1 sorted by their labels.
inline std::vector<uint32_t> label_order(const std::vector<uint64_t>& labels) {
  std::vector<uint32_t> order(labels.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<uint32_t>(i);
  std::sort(order.begin(), order.end(),
            [&labels](uint32_t x, uint32_t y) { return labels[x] < labels[y]; });
  return order;
}

/// Dense pair counter: every label of a and of b gets a dense id (LabelIds)
/// and each run adds its length to cell (ia, ib) of a row-major uint32 matrix,
/// grown by doubling rows / columns as ids appear.  The cells that become
/// non-zero are listed in first-touch order, so that reading the result costs
/// O(distinct pairs), not O(matrix).
///
/// Counts are uint32: the caller feeds at most 2^32 - 1 voxels.  A pair whose
/// ids would need more than `max_cells` cells is refused (add_runs stops
/// before it); the caller then moves to the sparse counter.
class DensePairCounter {
 public:
  explicit DensePairCounter(size_t max_cells) : s_(ScratchPool::take()), max_cells_(max_cells) {}
  ~DensePairCounter() { release(); }
  DensePairCounter(DensePairCounter&&) = default;
  DensePairCounter& operator=(DensePairCounter&&) = default;

  /// Count the runs that end at s + starts[0..k) (a run ends where the next
  /// one starts); the first pending run starts at run_start, which is
  /// advanced.  Returns the number of runs counted (< k: a refused pair).
  template <class TA, class TB>
  int64_t add_runs(const TA* a, const TB* b, const int32_t* starts, int64_t k, int64_t s,
                   int64_t& run_start) {
    // Locals (not members) in the loop: the uint32 cell stores could
    // otherwise alias the members and force reloads.
    const LabelIds::Slot* slots = s_->ids.slots();
    int shift = s_->ids.shift();
    // Ids are 1-based here: cell (ia, ib) is base[(ia + 1) * stride + ib + 1].
    size_t stride = stride_;
    uint32_t* base = s_->cells.data() - (stride + 1);
    int64_t p = run_start;
    int64_t j = 0;
    for (; j < k; ++j) {
      const int64_t i = s + starts[j];
      // The block scan alternates with these updates, which leaves the
      // hardware prefetchers idle: fetch the voxels of the next block ahead.
      prefetch_ahead(a + p);
      prefetch_ahead(b + p);
      const uint64_t va = a[p], vb = b[p];
      uint64_t fa = LabelIds::find(slots, shift, va, 0);
      uint64_t fb = LabelIds::find(slots, shift, vb, 1);
      if (__builtin_expect(fa * fb == 0, 0)) {  // a lookup missed: complete it
        const uint64_t f = slow_ids(va, vb);
        if (f == 0) break;
        fa = f >> 32;
        fb = f & 0xFFFFFFFFULL;
        slots = s_->ids.slots();
        shift = s_->ids.shift();
        stride = stride_;
        base = s_->cells.data() - (stride + 1);
      }
      uint32_t* c = base + fa * stride + fb;
      if (__builtin_expect(*c == 0, 0)) note_nonzero(fa, fb);
      *c += static_cast<uint32_t>(i - p);
      p = i;
    }
    run_start = p;
    return j;
  }

  /// Label of each id of a (side 0) or b (side 1).
  const std::vector<uint64_t>& values(int side) const { return s_->ids.values(side); }
  /// The non-zero cells as ia << 32 | ib.
  const std::vector<uint64_t>& nonzero() const { return s_->nonzero; }
  uint32_t count(uint64_t cell) const { return s_->cells.data()[index(cell)]; }

  /// The counted pairs as (a label, b label, count), sorted by (a, b); pairs
  /// with a zero label left out when ignore_zero.  A mostly non-zero matrix
  /// is read in label order; otherwise the listed cells are radix-sorted by
  /// (rank of a, rank of b).
  std::vector<PairEntry> sorted_entries(bool ignore_zero) const {
    std::vector<PairEntry> out;
    const std::vector<uint64_t>& nonzero = s_->nonzero;
    if (nonzero.empty()) return out;
    const std::vector<uint64_t>& va = s_->ids.values(0);
    const std::vector<uint64_t>& vb = s_->ids.values(1);
    const std::vector<uint32_t> order_a = label_order(va), order_b = label_order(vb);
    const uint32_t* cells = s_->cells.data();
    out.reserve(nonzero.size());
    if (nonzero.size() * 16 >= va.size() * vb.size()) {
      for (const uint32_t ia : order_a) {
        if (ignore_zero && va[ia] == 0) continue;
        const uint32_t* row = cells + static_cast<size_t>(ia) * stride_;
        for (const uint32_t ib : order_b) {
          const uint32_t c = row[ib];
          if (c != 0 && !(ignore_zero && vb[ib] == 0)) out.push_back(PairEntry{va[ia], vb[ib], c});
        }
      }
      return out;
    }
    std::vector<uint32_t> rank_a(va.size()), rank_b(vb.size());
    for (size_t r = 0; r < order_a.size(); ++r) rank_a[order_a[r]] = static_cast<uint32_t>(r);
    for (size_t r = 0; r < order_b.size(); ++r) rank_b[order_b[r]] = static_cast<uint32_t>(r);
    int bits_a = 0, bits_b = 0;
    while ((uint64_t(1) << bits_a) < va.size()) ++bits_a;
    while ((uint64_t(1) << bits_b) < vb.size()) ++bits_b;
    std::vector<KeyCount> records;
    records.reserve(nonzero.size());
    for (const uint64_t cell : nonzero) {
      const uint32_t ia = static_cast<uint32_t>(cell >> 32), ib = static_cast<uint32_t>(cell);
      if (ignore_zero && (va[ia] == 0 || vb[ib] == 0)) continue;
      records.push_back(KeyCount{(static_cast<uint64_t>(rank_a[ia]) << bits_b) | rank_b[ib],
                                 static_cast<int64_t>(cells[index(cell)])});
    }
    radix_sort(records, bits_a + bits_b);
    const uint64_t mask_b = (uint64_t(1) << bits_b) - 1;
    for (const KeyCount& r : records)
      out.push_back(
          PairEntry{va[order_a[r.key >> bits_b]], vb[order_b[r.key & mask_b]], r.count});
    return out;
  }

  /// Zero the matrix, empty the table and list, and hand them back to the
  /// pool.
  void release() {
    if (!s_) return;
    clear_cells();
    s_->ids.reset();
    s_->nonzero.clear();
    if (s_->nonzero.capacity() > (size_t(1) << 16)) std::vector<uint64_t>().swap(s_->nonzero);
    ScratchPool::give(std::move(s_));
    rows_ = stride_ = 0;
  }

 private:
  size_t index(uint64_t cell) const { return (cell >> 32) * stride_ + (cell & 0xFFFFFFFFULL); }

  /// Zero the used cells (the listed ones, or the whole used block when
  /// most of it is non-zero).
  void clear_cells() {
    uint32_t* c = s_->cells.data();
    const std::vector<uint64_t>& nonzero = s_->nonzero;
    if (nonzero.size() * 8 > rows_ * stride_) {
      std::memset(c, 0, rows_ * stride_ * sizeof(uint32_t));
    } else {
      for (const uint64_t cell : nonzero) c[index(cell)] = 0;
    }
  }

  /// Complete lookups (inserting new labels) and matrix growth: the 1-based
  /// ids of (va, vb) as fa << 32 | fb, or 0 when the matrix would pass
  /// max_cells.
  __attribute__((noinline)) uint64_t slow_ids(uint64_t va, uint64_t vb) {
    const uint32_t ia = s_->ids.get(va, 0), ib = s_->ids.get(vb, 1);
    if (!fit(ia, ib)) return 0;
    return (static_cast<uint64_t>(ia + 1) << 32) | (ib + 1);
  }

  __attribute__((noinline)) void note_nonzero(uint64_t fa, uint64_t fb) {
    s_->nonzero.push_back((static_cast<uint64_t>(fa - 1) << 32) | (fb - 1));
  }

  /// Grow the matrix to hold cell (ia, ib); false past max_cells.
  bool fit(uint32_t ia, uint32_t ib) {
    if (ia < rows_ && ib < stride_) return true;
    size_t rows = rows_ ? rows_ : 16, stride = stride_ ? stride_ : 64;
    while (rows <= ia) rows *= 2;
    while (stride <= ib) stride *= 2;
    if (rows > max_cells_ / stride) return false;
    const size_t need = rows * stride;
    CellBuffer& cells = s_->cells;
    if (need > cells.size()) {
      // A larger buffer: copy the used rows into the new layout.
      CellBuffer grown(need);
      for (size_t r = 0; r < rows_; ++r)
        std::memcpy(grown.data() + r * stride, cells.data() + r * stride_,
                    stride_ * sizeof(uint32_t));
      cells = std::move(grown);
    } else if (stride != stride_ && rows_ > 0) {
      // Same buffer, wider rows: move rows from the last one down (a row's
      // new place never overlaps a lower row's old place), then zero the new
      // columns (and whatever of the old layout is left there).
      uint32_t* c = cells.data();
      for (size_t r = rows_; r-- > 1;)
        std::memmove(c + r * stride, c + r * stride_, stride_ * sizeof(uint32_t));
      for (size_t r = 0; r < rows_; ++r)
        std::memset(c + r * stride + stride_, 0, (stride - stride_) * sizeof(uint32_t));
    }
    rows_ = rows;
    stride_ = stride;
    return true;
  }

  std::unique_ptr<DenseScratch> s_;
  size_t rows_ = 0, stride_ = 0;
  size_t max_cells_;
};

/// Pair counter of one thread.  Segmentations overlap in few distinct labels
/// and long runs, so it starts dense (DensePairCounter: two table lookups and
/// one matrix cell per run).  Past `max_cells` matrix cells (many distinct
/// labels), or past 2^32 - 1 voxels (uint32 counts), it moves its counts to a
/// SparsePairCounter and continues there.
class PairCounter {
 public:
  /// max_runs: an upper bound of the runs this counter will see (the length
  /// of its voxel range).
  explicit PairCounter(size_t max_runs = 0, size_t max_cells = size_t(1) << 22)
      : dense_(max_cells), max_runs_(max_runs) {}

  bool sparse() const { return sparse_ != nullptr; }
  bool ignore_zero() const { return ignore_zero_; }
  const DensePairCounter& dense() const { return dense_; }
  SparsePairCounter& sparse_counter() { return *sparse_; }

  /// Count the pairs (a[i], b[i]) for begin <= i < end (a counter may take
  /// several ranges, all with the same ignore_zero).  ignore_zero: skip pairs
  /// where either label is 0.
  ///
  /// Run boundaries are first collected per block of kBlock voxels
  /// (branch-free: a data-dependent branch per voxel would mispredict at most
  /// run ends), then each run costs one counter update.  Small blocks keep the
  /// scan's memory reads close to the updates, so that the two overlap.
  template <class TA, class TB>
  void count_range(const TA* a, const TB* b, int64_t begin, int64_t end, bool ignore_zero) {
    ignore_zero_ = ignore_zero;
    if (begin >= end) return;
    voxels_ += static_cast<uint64_t>(end - begin);
    if (voxels_ > 0xFFFFFFFFULL) to_sparse();  // uint32 matrix cells could overflow
#ifdef FFN_RECONCILE_AVX2
    const bool avx2 = scan_simd_allowed().load(std::memory_order_relaxed) &&
                      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi");
#endif
    constexpr int64_t kBlock = 128;
    int32_t starts[kBlock + 1];
    int64_t run_start = begin;
    for (int64_t s = begin + 1; s <= end; s += kBlock) {
      const int64_t e = (end - s < kBlock) ? end : s + kBlock;
#ifdef FFN_RECONCILE_AVX2
      int64_t k = avx2 ? run_starts_avx2(a, b, s, e, s, starts, 0)
                       : run_starts_scalar(a, b, s, e, s, starts, 0);
#else
      int64_t k = run_starts_scalar(a, b, s, e, s, starts, 0);
#endif
      if (e == end) starts[k++] = static_cast<int32_t>(end - s);  // the last run ends at `end`
      int64_t j = 0;
      if (!sparse_) {
        j = dense_.add_runs(a, b, starts, k, s, run_start);
        if (j < k) to_sparse();
      }
      for (; j < k; ++j) {
        const int64_t i = s + starts[j];
        add_sparse(a[run_start], b[run_start], i - run_start);
        run_start = i;
      }
    }
  }

  /// Move the dense counts to the sparse counter (no-op when already there).
  void to_sparse() {
    if (sparse_) return;
    sparse_.reset(new SparsePairCounter(max_runs_));
    const std::vector<uint64_t>& va = dense_.values(0);
    const std::vector<uint64_t>& vb = dense_.values(1);
    for (const uint64_t cell : dense_.nonzero())
      add_sparse(va[cell >> 32], vb[cell & 0xFFFFFFFFULL], dense_.count(cell));
    dense_.release();
  }

 private:
  void add_sparse(uint64_t a, uint64_t b, int64_t n) {
    if (!(ignore_zero_ && (a == 0 || b == 0))) sparse_->add(a, b, n);
  }

  DensePairCounter dense_;
  std::unique_ptr<SparsePairCounter> sparse_;
  size_t max_runs_;
  uint64_t voxels_ = 0;
  bool ignore_zero_ = false;
};

/// Count the pairs (a[i], b[i]) for begin <= i < end into `counter`.
/// ignore_zero: skip pairs where either label is 0.
template <class TA, class TB>
inline void count_pairs_range(const TA* a, const TB* b, int64_t begin, int64_t end,
                              bool ignore_zero, PairCounter& counter) {
  counter.count_range(a, b, begin, end, ignore_zero);
}

/// Merge two lists sorted lexicographically by (a, b), adding the counts of
/// equal pairs.
inline std::vector<PairEntry> merge_entries(const std::vector<PairEntry>& x,
                                            const std::vector<PairEntry>& y) {
  std::vector<PairEntry> out;
  out.reserve(x.size() + y.size());
  size_t i = 0, j = 0;
  while (i < x.size() && j < y.size()) {
    const PairEntry& p = x[i];
    const PairEntry& q = y[j];
    if (p.a < q.a || (p.a == q.a && p.b < q.b)) {
      out.push_back(p);
      ++i;
    } else if (q.a < p.a || q.b < p.b) {
      out.push_back(q);
      ++j;
    } else {
      out.push_back(PairEntry{p.a, p.b, p.count + q.count});
      ++i;
      ++j;
    }
  }
  out.insert(out.end(), x.begin() + static_cast<std::ptrdiff_t>(i), x.end());
  out.insert(out.end(), y.begin() + static_cast<std::ptrdiff_t>(j), y.end());
  return out;
}

/// Combine the per-thread counters into the distinct pairs sorted
/// lexicographically by (a, b): each dense counter lists its own pairs in
/// order (DensePairCounter::sorted_entries), and the lists are merged.
inline std::vector<PairEntry> finish_counts(std::vector<PairCounter>& counters) {
  bool any_sparse = false, ignore_zero = false;
  for (PairCounter& c : counters) {
    any_sparse = any_sparse || c.sparse();
    ignore_zero = ignore_zero || c.ignore_zero();
  }
  if (any_sparse) {
    std::vector<SparsePairCounter> sparse;
    sparse.reserve(counters.size());
    for (PairCounter& c : counters) {
      c.to_sparse();
      sparse.push_back(std::move(c.sparse_counter()));
    }
    return finish_sparse_counts(sparse);
  }
  std::vector<PairEntry> out;
  for (PairCounter& c : counters) {
    std::vector<PairEntry> mine = c.dense().sorted_entries(ignore_zero);
    out = out.empty() ? std::move(mine) : merge_entries(out, mine);
  }
  return out;
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
