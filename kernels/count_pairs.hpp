// SPDX-License-Identifier: Apache-2.0
//
// count_pairs: every distinct (a[i], b[i]) label pair over two label spans of
// the same length, with its count (the overlap table of two segmentations).
//
// The result, which must agree exactly with
// floodfilling.kernels_reference.count_pairs_reference (np.unique: the same
// pairs, in the same order, with the same counts): the distinct pairs sorted
// lexicographically by (a, b), each with its count; with ignore_zero, pairs
// where either label is 0 are left out.
//
// Algorithm:
//   * count_pairs_range counts every (a[i], b[i]) over i in [begin, end) into
//     a PairCounter (one per thread).  Runs of identical consecutive pairs
//     (the common case in label volumes) cost one update per run: the run
//     starts of a block of 128 voxels come from a branch-free scan
//     (run_starts.hpp; AVX2 where the CPU has it), then each run adds its
//     length to a cell of a dense (label of a x label of b) uint32 matrix
//     (DensePairCounter), labels being mapped to dense ids by a small hash
//     table (LabelIds; memory pooled between calls: dense_scratch.hpp).
//   * Past max_cells matrix cells (many distinct labels; 2^22 by default) or
//     2^32 - 1 voxels (uint32 counts), a counter moves its counts to a
//     SparsePairCounter (sparse_pair_count.hpp: pair hash map, then
//     radix-sorted run lists) and continues there.
//   * finish_counts combines the counters: each dense counter lists its pairs
//     in (a, b) order and the lists are merged; when any counter went sparse,
//     all do and the sparse path sorts and reduces them.
//
// Complexity: O(n) for n voxels (the scan, plus one table lookup pair and one
// matrix update per run); reading out P distinct pairs over L distinct labels
// costs O(P + L log L) (labels sorted, cells radix-sorted by label rank, or
// the matrix walked in label order when mostly non-zero).  Memory: at most
// max_cells uint32 cells (16 MiB by default) per counter.
//
// Threading: nothing here starts threads.  A PairCounter is used by one
// thread at a time; the binding (csrc/bind_reconcile.cpp) gives each thread
// its own counter and claims pieces of [0, n) for it, then calls
// finish_counts serially.  The result does not depend on the split.
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).  Namespace ffn::kernels::reconcile, shared by the
// overlap-reconciliation family: count_pairs.hpp (with run_starts.hpp,
// dense_scratch.hpp, sparse_pair_count.hpp), union_find.hpp, relabel.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "dense_scratch.hpp"
#include "run_starts.hpp"
#include "sparse_pair_count.hpp"

namespace ffn {
namespace kernels {
namespace reconcile {

/// Prefetch the cache line kPrefetchVoxels voxels past p (integer arithmetic:
/// the address may lie past the array; a prefetch never faults).
template <class T>
inline void prefetch_ahead(const T* p) {
  constexpr uintptr_t kPrefetchVoxels = 1024;
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchVoxels * sizeof(T)));
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

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
