// SPDX-License-Identifier: Apache-2.0
//
// CPU launcher (OpenMP when available) over the kernel bodies in kernels/.
#include "csrc/launch_omp.hpp"

#include <algorithm>
#include <atomic>
#include <limits>

namespace ffn {
namespace launch {

namespace {

int default_threads() {
#ifdef FFN_HAVE_OPENMP
  const int n = omp_get_max_threads();
  return n > 0 ? n : 1;
#else
  return 1;
#endif
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{default_threads()};
  return threads;
}

// Work is split between threads only in chunks of at least this many
// elements (~1-5 ms of work): below it, the fork/join cost and, on a busy
// machine, waiting for a descheduled thread at the barrier (up to a
// scheduler time slice, several ms) outweigh the gain.
// (Adjustable for tests: see set_parallel_grain.)
constexpr int64_t kDefaultGrain = int64_t(1) << 21;

std::atomic<int64_t>& grain_setting() {
  static std::atomic<int64_t> grain{kDefaultGrain};
  return grain;
}

int64_t grain() { return grain_setting().load(std::memory_order_relaxed); }

int64_t flat_chunks(int64_t n, int threads) {
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads, n / grain()));
}

// ISA dispatch.  The kernel bodies are compiled for the baseline ISA (the
// wheel must run on any x86-64); these wrappers are cloned for AVX2 and
// AVX-512 with GCC/Clang function multiversioning (resolved once, at load
// time, by an ifunc) and the bodies are inlined into each clone, so the
// vectorised loops use the widest vectors the CPU has.  Results are identical:
// the loops only compare, select and copy floats (no reassociation).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__INTEL_LLVM_COMPILER) && !defined(FFN_NO_MULTIVERSIONING)
#define FFN_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define FFN_CLONES
#endif

FFN_CLONES void update_fov_isa(float* box, int64_t sz, int64_t sy, float* fov, int64_t fz,
                               int64_t fy, int64_t fx, float move_threshold, double disco,
                               const int64_t deltas[3], float* scores, int64_t* offsets) {
  kernels::update_fov(box, sz, sy, fov, fz, fy, fx, move_threshold, disco, deltas, scores,
                      offsets);
}

FFN_CLONES void gather_fov_isa(const float* box, int64_t sz, int64_t sy, float* out,
                               int64_t fz, int64_t fy, int64_t fx, float pad_value) {
  kernels::gather_fov(box, sz, sy, out, fz, fy, fx, pad_value);
}

template <class T>
using Cands = std::vector<kernels::peaks::Candidate<T>>;

FFN_CLONES kernels::peaks::SlabFlags filter_slab_isa(
    const float* image, int64_t nz, int64_t ny, int64_t nx, int64_t r, float threshold,
    const int64_t border[3], bool plain, int64_t z0, int64_t z1,
    kernels::peaks::SlabScratch<float>& s, Cands<float>& out) {
  return kernels::peaks::filter_slab(image, nz, ny, nx, r, threshold, border, plain, z0, z1, s,
                                     out);
}

FFN_CLONES kernels::peaks::SlabFlags filter_slab_isa(
    const double* image, int64_t nz, int64_t ny, int64_t nx, int64_t r, double threshold,
    const int64_t border[3], bool plain, int64_t z0, int64_t z1,
    kernels::peaks::SlabScratch<double>& s, Cands<double>& out) {
  return kernels::peaks::filter_slab(image, nz, ny, nx, r, threshold, border, plain, z0, z1, s,
                                     out);
}

}  // namespace

bool have_openmp() {
#ifdef FFN_HAVE_OPENMP
  return true;
#else
  return false;
#endif
}

int num_threads() { return thread_setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
#ifdef FFN_HAVE_OPENMP
  thread_setting().store(n > 0 ? n : default_threads(), std::memory_order_relaxed);
#else
  (void)n;  // built without OpenMP: always one thread
#endif
}

int64_t set_parallel_grain(int64_t n) {
  return grain_setting().exchange(n > 0 ? n : kDefaultGrain, std::memory_order_relaxed);
}

// ---------------------------------------------------------------- FOV update

void update_fovs(const FovTarget* targets, int64_t k, float* logits, const int64_t f[3],
                 float move_threshold, double disco_seed_threshold,
                 const int64_t deltas[3], float* scores, int64_t* offsets,
                 bool parallel) {
  const int64_t fsize = f[0] * f[1] * f[2];
  auto body = [&](int64_t i) {
    const FovTarget& t = targets[i];
    update_fov_isa(box_origin(t, f), t.shape[1] * t.shape[2], t.shape[2], logits + i * fsize,
                   f[0], f[1], f[2], move_threshold, disco_seed_threshold, deltas,
                   scores + 6 * i, offsets + 18 * i);
  };
  if (parallel && k * fsize >= grain())
    parallel_for(k, num_threads(), body);
  else
    for (int64_t i = 0; i < k; ++i) body(i);  // in order: deterministic overlaps
}

void gather_fovs(const FovTarget* targets, int64_t k, float* out, const int64_t f[3],
                 float pad_value) {
  const int64_t fsize = f[0] * f[1] * f[2];
  const int threads = k * fsize >= grain() ? num_threads() : 1;
  parallel_for(k, threads, [&](int64_t i) {
    const FovTarget& t = targets[i];
    gather_fov_isa(box_origin(t, f), t.shape[1] * t.shape[2], t.shape[2], out + i * fsize,
                   f[0], f[1], f[2], pad_value);
  });
}

// -------------------------------------------------------------------- peaks

namespace {

template <class T>
std::vector<int64_t> find_peaks_impl(const T* image, const int64_t shape[3],
                                     int64_t min_distance, T threshold,
                                     const int64_t border[3], bool* has_nan) {
  namespace pk = kernels::peaks;
  *has_nan = false;
  const int64_t nz = shape[0], ny = shape[1], nx = shape[2];
  const int64_t n = nz * ny * nx;
  if (n == 0) return {};
  const bool plain = min_distance == 0 || n == 1;
  const int threads = num_threads();
  const int64_t nchunks = std::min<int64_t>(flat_chunks(n, threads), nz);
  std::vector<std::vector<pk::Candidate<T>>> cands(static_cast<size_t>(nchunks));
  std::vector<pk::SlabFlags> flags(static_cast<size_t>(nchunks));
  parallel_for(nchunks, threads, [&](int64_t c) {
    const int64_t z0 = nz * c / nchunks, z1 = nz * (c + 1) / nchunks;
    pk::SlabScratch<T> scratch;
    flags[c] = filter_slab_isa(image, nz, ny, nx, min_distance, threshold, border, plain,
                               z0, z1, scratch, cands[c]);
  });
  bool non_max = false;
  for (const auto& fl : flags) {
    if (fl.has_nan) *has_nan = true;
    if (fl.has_non_max) non_max = true;
  }
  if (*has_nan) return {};
  if (!plain && !non_max) return {};  // every voxel is its own maximum: no peaks
  std::vector<pk::Candidate<T>> all;
  size_t total = 0;
  for (const auto& c : cands) total += c.size();
  all.reserve(total);
  for (const auto& c : cands) all.insert(all.end(), c.begin(), c.end());
  std::vector<int64_t> out;
  if (min_distance <= 1) {  // no spacing step: already in raster order
    out.reserve(all.size());
    for (const auto& c : all) out.push_back(c.index);
    return out;
  }
  pk::sort_candidates(all);
  out = pk::greedy_spacing(all, nz, ny, nx, min_distance);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::vector<int64_t> find_peaks(const float* image, const int64_t shape[3],
                                int64_t min_distance, float threshold,
                                const int64_t border[3], bool* has_nan) {
  return find_peaks_impl<float>(image, shape, min_distance, threshold, border, has_nan);
}

std::vector<int64_t> find_peaks(const double* image, const int64_t shape[3],
                                int64_t min_distance, double threshold,
                                const int64_t border[3], bool* has_nan) {
  return find_peaks_impl<double>(image, shape, min_distance, threshold, border, has_nan);
}

// ---------------------------------------------------------------- reconcile

namespace {

template <class L>
void relabel_impl(L* labels, int64_t n, const uint64_t* keys, const uint64_t* values,
                  int64_t nkeys) {
  // Keys above the label type's range can never match: keys are sorted, so
  // keep the prefix that fits.
  const uint64_t lmax = static_cast<uint64_t>(std::numeric_limits<L>::max());
  const int64_t usable = std::upper_bound(keys, keys + nkeys, lmax) - keys;
  if (usable == 0 || n == 0) return;
  const kernels::reconcile::KeyValueMap map(keys, values, usable);
  const int threads = num_threads();
  const int64_t nchunks = flat_chunks(n, threads);
  parallel_for(nchunks, threads, [&](int64_t c) {
    kernels::reconcile::relabel_range(labels, n * c / nchunks, n * (c + 1) / nchunks, map);
  });
}

}  // namespace

void relabel(void* labels, int bits, int64_t n, const uint64_t* keys,
             const uint64_t* values, int64_t nkeys) {
  if (bits == 32)
    relabel_impl(static_cast<uint32_t*>(labels), n, keys, values, nkeys);
  else
    relabel_impl(static_cast<uint64_t*>(labels), n, keys, values, nkeys);
}

// count_pairs threading.  Counting runs at about 1.5 ns per voxel and is
// largely bound by reading the labels from memory; a second core adds read
// bandwidth (64x256x256 uint64 pairs on this 2-core machine: 6.1 ms on one
// thread, 4.0 ms on two, also with a niced job on the other core), at the cost
// of a separate label table, matrix and merge.  Threads are used from
// kDefaultPairGrain voxels per thread; pieces of the range are claimed
// dynamically, so a thread that starts late (descheduled) takes less.
namespace {

constexpr int64_t kDefaultPairGrain = int64_t(1) << 21;

std::atomic<int64_t>& pair_grain() {
  static std::atomic<int64_t> grain{kDefaultPairGrain};
  return grain;
}

template <class TA, class TB>
std::vector<PairSlot> count_pairs_typed(const TA* a, const TB* b, int64_t n, bool ignore_zero) {
  using kernels::reconcile::PairCounter;
  const int64_t grain = pair_grain().load(std::memory_order_relaxed);
  const int threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), n / grain)));
  std::vector<PairCounter> counters;
  counters.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) counters.emplace_back(static_cast<size_t>(n / threads));
  if (threads == 1) {
    kernels::reconcile::count_pairs_range(a, b, 0, n, ignore_zero, counters[0]);
  } else {
    const int64_t pieces = 4 * static_cast<int64_t>(threads);
    std::atomic<int64_t> next{0};
    parallel_for(threads, threads, [&](int64_t t) {
      for (int64_t k; (k = next.fetch_add(1)) < pieces;)
        kernels::reconcile::count_pairs_range(a, b, n * k / pieces, n * (k + 1) / pieces,
                                              ignore_zero, counters[static_cast<size_t>(t)]);
    });
  }
  return kernels::reconcile::finish_counts(counters);
}

}  // namespace

int64_t set_count_pairs_grain(int64_t n) {
  return pair_grain().exchange(n > 0 ? n : kDefaultPairGrain, std::memory_order_relaxed);
}

std::vector<PairSlot> count_pairs(const void* a, int a_bits, const void* b, int b_bits, int64_t n,
                                  bool ignore_zero) {
  if (a_bits == 32 && b_bits == 32)
    return count_pairs_typed(static_cast<const uint32_t*>(a), static_cast<const uint32_t*>(b),
                             n, ignore_zero);
  if (a_bits == 32)
    return count_pairs_typed(static_cast<const uint32_t*>(a), static_cast<const uint64_t*>(b),
                             n, ignore_zero);
  if (b_bits == 32)
    return count_pairs_typed(static_cast<const uint64_t*>(a), static_cast<const uint32_t*>(b),
                             n, ignore_zero);
  return count_pairs_typed(static_cast<const uint64_t*>(a), static_cast<const uint64_t*>(b), n,
                           ignore_zero);
}

// ---------------------------------------------------------------- commit

CommitResult commit_object(const float* logits, int64_t lsz, int64_t lsy, int32_t* seg,
                           int64_t ssz, int64_t ssy, const int64_t size[3], float seg_threshold,
                           int64_t min_size, int32_t new_id) {
  CommitResult out;
  // Count only until min_size is reached (an accepted object's claim pass counts all).
  out.n_new = kernels::commit_count_new(logits, lsz, lsy, seg, ssz, ssy, size[0], size[1],
                                        size[2], seg_threshold, std::max<int64_t>(min_size, 0));
  if (out.n_new < min_size) return out;
  const int64_t cap = size[0] * size[1] * size[2];
  std::vector<int32_t> ids(static_cast<size_t>(cap));
  std::vector<int64_t> lens(static_cast<size_t>(cap));
  int64_t runs = 0;
  out.n_new = kernels::commit_claim(logits, lsz, lsy, seg, ssz, ssy, size[0], size[1], size[2],
                                    seg_threshold, new_id, ids.data(), lens.data(), &runs);
  // the runs of equal ids, merged by id (sorted)
  auto& merged = out.overlaps;
  merged.reserve(static_cast<size_t>(runs));
  for (int64_t i = 0; i < runs; ++i) merged.emplace_back(ids[i], lens[i]);
  std::sort(merged.begin(), merged.end());
  size_t w = 0;
  for (size_t i = 0; i < merged.size(); ++i) {
    if (w > 0 && merged[w - 1].first == merged[i].first)
      merged[w - 1].second += merged[i].second;
    else
      merged[w++] = merged[i];
  }
  merged.resize(w);
  return out;
}

}  // namespace launch
}  // namespace ffn
