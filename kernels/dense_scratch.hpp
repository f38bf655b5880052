// SPDX-License-Identifier: Apache-2.0
//
// Working memory of count_pairs' dense counter (DensePairCounter in
// count_pairs.hpp): the label-id hash table, the pair-matrix allocator and
// the process-wide pool that keeps both between calls.
//
//   * LabelIds: dense ids 0, 1, 2, ... (in order of first appearance) for the
//     distinct labels of each input, in one open-addressing table keyed by
//     label (multiplicative hash, linear probing that never wraps, load at
//     most 1/8).  The hot-loop lookup (find) compares two slots without a
//     branch; get() is the complete lookup / insertion.  O(1) expected per
//     lookup, O(L) memory for L distinct labels.
//   * CellBuffer: the zero-filled uint32 pair matrix.  Buffers of 2 MiB and
//     more are 2 MiB aligned and, on Linux, advised to use transparent huge
//     pages (the matrix is read at scattered rows).
//   * DenseScratch, ScratchPool: the table, matrix and non-zero cell list of
//     one counter, kept between calls in a pool of at most 8 of them with at
//     most 2^23 matrix cells (32 MiB) in all: fresh allocations of this size
//     cost page faults comparable to the counting itself.
//   * label_order: ids sorted by their labels (to read results in order).
//
// Nothing here decides a result: count_pairs, which must agree exactly with
// floodfilling.kernels_reference.count_pairs_reference, only keeps its counts
// here.
//
// Threading: a DenseScratch is used by one thread at a time; ScratchPool's
// take() and give() are mutex-protected (the pool is process-wide).
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
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ffn {
namespace kernels {
namespace reconcile {

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

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
