// SPDX-License-Identifier: Apache-2.0
//
// SYCL device kernels: free-function kernels over the UNCHANGED bodies in
// kernels/*.hpp (the ones csrc/launch_omp.cpp runs on CPU threads), so that a
// SYCL device computes exactly what the OpenMP launcher and the NumPy
// references (floodfilling.kernels_reference) compute.
//
// How it is built: at run time, by the SYCL runtime's kernel compiler
// (sycl_ext_oneapi_kernel_compiler, source_language::sycl), from this file and
// the kernels/*.hpp headers passed as include files, with -ffp-contract=off
// (no FMA contraction: results stay bitwise equal to the CPU build).  See
// python/floodfilling/sycl_backend.py, which also launches them through the
// small C ABI of sycl/host.cpp.  Nothing here is specific to the runtime
// compiler: free-function kernels are also accepted by icpx ahead of time
// (sycl/README.md).
//
// Every kernel is extern "C" (its name is its symbol) and a 1-D nd_range
// kernel; global sizes are rounded up to the work-group size, so each kernel
// checks its index against the real count.  Pointers are USM allocations.
//
// Work decomposition (one work-item per ...):
//   ffn_gather_fovs      FOV row (k, z, y): kernels::gather_fov on a 1 x 1 x fx
//                        box (K * fz * fy items).
//   ffn_update_fovs      FOV k: kernels::update_fov, the whole FOV (disco
//                        count, write, six face maxima) in one work-item.
//   ffn_update_fovs_serial  one work-item runs FOVs 0..K-1 in order: used when
//                        two FOVs share canvas memory (their boxes may overlap,
//                        and the result is defined by the order k = 0..K-1,
//                        as in the CPU launcher, which also runs them
//                        serially then).
//   ffn_relabel_u32/u64  voxel: kernels::reconcile::relabel_one, a binary
//                        search in the sorted keys.
//   ffn_count_pairs_starts  voxel: 1 where the (a, b) pair differs from the
//                        previous voxel's (a run start).
//   ffn_count_pairs_insert  voxel that starts a run: walks to the run's end
//                        and adds its length to the pair's count in a device
//                        hash table (below).
//   ffn_peaks_*_f32/f64  image row (z, y), three passes: x maxima
//                        (peaks::row_max), y maxima of those (accumulate_max
//                        over the rows y-r..y+r), then the z maxima of those
//                        and the candidate test of filter_slab: a candidate
//                        mask per voxel and NaN / non-maximum flags per row.
//
// Where the CPU algorithm does not fit a device:
//   * update_fovs: the CPU body is serial within a FOV (the disco rule needs
//     the count over the whole FOV before any write; the face maxima read the
//     written FOV), so a FOV is one work-item; on a CPU device with K >= cores
//     that is the same parallelism as the OpenMP launcher.
//   * find_peaks: the CPU launcher's filter_slab keeps a ring of 2-D plane
//     maxima per thread and walks its slab of planes in order; on a device
//     every row is independent instead: three passes over full-size buffers
//     (x, y, z maxima), the same maxima (max is exact) and the same candidate
//     test.  Sorting the candidates (by descending value, ties in raster
//     order) and the greedy minimum-spacing pass are serial by nature (each
//     acceptance depends on all earlier ones): the host does them
//     (floodfilling.sycl_backend.find_peaks).
//   * count_pairs: the CPU algorithm gives each thread a dense label x label
//     matrix (or a sparse hash map / sorted run lists) and merges them
//     serially, none of which fits a device.  Device algorithm: run starts,
//     then one open-addressing hash table (linear probing, mix64 hash of
//     relabel.hpp, atomic compare-and-swap to claim a slot) per input that
//     maps each label to a slot, and a third table keyed by the pair of slots
//     whose counts are atomic adds of run lengths.  Tables store key + 1
//     (0 = empty; the label 2^64 - 1 has a slot of its own) and have at least
//     twice as many slots as runs, so they never fill.  The host then reads
//     the M distinct pairs and sorts them by (a, b) (O(M log M), M much
//     smaller than the voxels for segmentations).  Atomic adds of integers
//     give exact counts in any order.
//   * relabel: the CPU launcher builds a hash map of the keys per call and
//     caches the last lookup (runs of equal labels); a device work-item per
//     voxel instead binary-searches the sorted keys (relabel_one, O(log k),
//     no allocation) -- the same result.
//
// A FOV target is 7 int64 values: the canvas pointer (a USM pointer as an
// integer), the canvas shape (z, y, x) and the FOV centre (z, y, x), already
// checked on the host to keep the box inside the canvas.
#include <sycl/sycl.hpp>

#include <cstdint>

#include "kernels/fov_update.hpp"
#include "kernels/peaks.hpp"
#include "kernels/relabel.hpp"

namespace ffn_sycl {

namespace syclexp = sycl::ext::oneapi::experimental;

inline int64_t global_id() {
  return static_cast<int64_t>(
      sycl::ext::oneapi::this_work_item::get_nd_item<1>().get_global_id(0));
}

/// Canvas element at the FOV box origin (centre - f/2) of target t, and the
/// canvas strides (sz, sy).
inline float* box_origin(const int64_t* t, int64_t f0, int64_t f1, int64_t f2, int64_t* sz,
                         int64_t* sy) {
  float* canvas = reinterpret_cast<float*>(static_cast<uintptr_t>(t[0]));
  *sy = t[3];
  *sz = t[2] * t[3];
  return canvas + (t[4] - f0 / 2) * *sz + (t[5] - f1 / 2) * *sy + (t[6] - f2 / 2);
}

inline void update_one(const int64_t* targets, int64_t i, float* logits, int64_t f0, int64_t f1,
                       int64_t f2, float move_threshold, double disco, int64_t d0, int64_t d1,
                       int64_t d2, float* scores, int64_t* offsets) {
  int64_t sz = 0, sy = 0;
  float* box = box_origin(targets + 7 * i, f0, f1, f2, &sz, &sy);
  const int64_t deltas[3] = {d0, d1, d2};
  ffn::kernels::update_fov(box, sz, sy, logits + i * f0 * f1 * f2, f0, f1, f2, move_threshold,
                           disco, deltas, scores + 6 * i, offsets + 18 * i);
}

}  // namespace ffn_sycl

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_gather_fovs(const int64_t* targets, int64_t k, float* out, int64_t f0, int64_t f1,
                     int64_t f2, float pad_value) {
  const int64_t row = ffn_sycl::global_id();  // (i * f0 + z) * f1 + y
  if (row >= k * f0 * f1) return;
  const int64_t i = row / (f0 * f1), z = (row / f1) % f0, y = row % f1;
  int64_t sz = 0, sy = 0;
  const float* box = ffn_sycl::box_origin(targets + 7 * i, f0, f1, f2, &sz, &sy);
  ffn::kernels::gather_fov(box + z * sz + y * sy, sz, sy, out + row * f2, 1, 1, f2, pad_value);
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_update_fovs(const int64_t* targets, int64_t k, float* logits, int64_t f0, int64_t f1,
                     int64_t f2, float move_threshold, double disco_seed_threshold, int64_t d0,
                     int64_t d1, int64_t d2, float* scores, int64_t* offsets) {
  const int64_t i = ffn_sycl::global_id();
  if (i >= k) return;
  ffn_sycl::update_one(targets, i, logits, f0, f1, f2, move_threshold, disco_seed_threshold, d0,
                       d1, d2, scores, offsets);
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_update_fovs_serial(const int64_t* targets, int64_t k, float* logits, int64_t f0,
                            int64_t f1, int64_t f2, float move_threshold,
                            double disco_seed_threshold, int64_t d0, int64_t d1, int64_t d2,
                            float* scores, int64_t* offsets) {
  if (ffn_sycl::global_id() != 0) return;
  for (int64_t i = 0; i < k; ++i)
    ffn_sycl::update_one(targets, i, logits, f0, f1, f2, move_threshold, disco_seed_threshold,
                         d0, d1, d2, scores, offsets);
}

// relabel, one kernel per label type (uint32, uint64): one work-item per voxel.
#define FFN_RELABEL_KERNEL(L, SUFFIX)                                                            \
  extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY(                                                  \
      (sycl::ext::oneapi::experimental::nd_range_kernel<1>)) void                                \
      ffn_relabel_##SUFFIX(L* labels, int64_t n, const uint64_t* keys, const uint64_t* values,   \
                           int64_t nkeys) {                                                      \
    const int64_t i = ffn_sycl::global_id();                                                     \
    if (i < n) labels[i] = ffn::kernels::reconcile::relabel_one<L>(labels[i], keys, values, nkeys); \
  }

FFN_RELABEL_KERNEL(uint32_t, u32)
FFN_RELABEL_KERNEL(uint64_t, u64)

// ------------------------------------------------------------------ peaks

namespace ffn_sycl {

template <class T>
inline void peaks_xmax(const T* image, T* xmax, int64_t nrows, int64_t nx, int64_t r) {
  const int64_t row = global_id();
  if (row < nrows) ffn::kernels::peaks::row_max(image + row * nx, xmax + row * nx, nx, r);
}

/// out[x] = max of rows c-r..c+r (clipped to 0..n-1) of `src`, rows `step`
/// values apart, x < nx: the sliding-window maximum along y (step nx) or z
/// (step ny * nx) of the separable max filter.
template <class T>
inline void window_max(T* out, const T* src, int64_t c, int64_t r, int64_t n, int64_t step, int64_t nx) {
  const int64_t lo = c - r < 0 ? 0 : c - r;
  const int64_t hi = c + r > n - 1 ? n - 1 : c + r;
  const T* first = src + lo * step;
  for (int64_t x = 0; x < nx; ++x) out[x] = first[x];
  for (int64_t i = lo + 1; i <= hi; ++i) ffn::kernels::peaks::accumulate_max(out, src + i * step, nx);
}

template <class T>
inline void peaks_ymax(const T* xmax, T* max2d, int64_t nz, int64_t ny, int64_t nx, int64_t r) {
  const int64_t row = global_id();
  if (row >= nz * ny) return;
  const int64_t z = row / ny, y = row % ny;
  window_max(max2d + row * nx, xmax + z * ny * nx, y, r, ny, nx, nx);
}

/// The candidate test of peaks::filter_slab for row (z, y): cand[i] = 1 for a
/// candidate voxel i; flags[row] bit 0: a NaN in the row, bit 1: a voxel below
/// its local maximum.  `m` is scratch of one row per work-item (n values).
template <class T>
inline void peaks_test(const T* image, const T* max2d, T* m_all, uint8_t* cand,
                       uint8_t* flags, int64_t nz, int64_t ny, int64_t nx, int64_t r,
                       T threshold, int64_t bz, int64_t by, int64_t bx, int64_t plain) {
  const int64_t row = global_id();
  if (row >= nz * ny) return;
  const int64_t z = row / ny, y = row % ny;
  const T* v = image + row * nx;
  uint8_t* c = cand + row * nx;
  const bool in = z >= bz && z < nz - bz && y >= by && y < ny - by;
  uint8_t fl = 0;
  if (plain) {
    for (int64_t x = 0; x < nx; ++x) {
      if (v[x] != v[x]) fl |= 1;
      c[x] = (in && x >= bx && x < nx - bx && v[x] > threshold) ? 1 : 0;
    }
    flags[row] = fl;
    return;
  }
  T* m = m_all + row * nx;
  window_max(m, max2d + y * nx, z, r, nz, ny * nx, nx);
  for (int64_t x = 0; x < nx; ++x) {
    if (v[x] != v[x]) fl |= 1;
    if (v[x] != m[x]) fl |= 2;
    c[x] = (in && x >= bx && x < nx - bx && v[x] == m[x] && v[x] > threshold) ? 1 : 0;
  }
  flags[row] = fl;
}

}  // namespace ffn_sycl

#define FFN_PEAKS_KERNELS(T, SUFFIX)                                                           \
  extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY(                                                \
      (sycl::ext::oneapi::experimental::nd_range_kernel<1>)) void                              \
      ffn_peaks_xmax_##SUFFIX(const T* image, T* xmax, int64_t nrows, int64_t nx, int64_t r) { \
    ffn_sycl::peaks_xmax<T>(image, xmax, nrows, nx, r);                                        \
  }                                                                                            \
  extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY(                                                \
      (sycl::ext::oneapi::experimental::nd_range_kernel<1>)) void                              \
      ffn_peaks_ymax_##SUFFIX(const T* xmax, T* max2d, int64_t nz, int64_t ny, int64_t nx,     \
                              int64_t r) {                                                     \
    ffn_sycl::peaks_ymax<T>(xmax, max2d, nz, ny, nx, r);                                       \
  }                                                                                            \
  extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY(                                                \
      (sycl::ext::oneapi::experimental::nd_range_kernel<1>)) void                              \
      ffn_peaks_test_##SUFFIX(const T* image, const T* max2d, T* m, uint8_t* cand,             \
                              uint8_t* flags, int64_t nz, int64_t ny, int64_t nx, int64_t r,   \
                              T threshold, int64_t bz, int64_t by, int64_t bx,                 \
                              int64_t plain) {                                                 \
    ffn_sycl::peaks_test<T>(image, max2d, m, cand, flags, nz, ny, nx, r, threshold, bz, by,    \
                            bx, plain);                                                        \
  }

FFN_PEAKS_KERNELS(float, f32)
FFN_PEAKS_KERNELS(double, f64)

// ------------------------------------------------------------- count_pairs

namespace ffn_sycl {

using atomic_u64 = sycl::atomic_ref<uint64_t, sycl::memory_order::relaxed,
                                    sycl::memory_scope::device,
                                    sycl::access::address_space::global_space>;

/// Slot of `key` in an open-addressing table of cap (a power of two) + 1
/// uint64 slots holding key + 1 (0 = empty), claimed if absent; the key
/// 2^64 - 1 (whose key + 1 is 0) has the extra slot `cap`.  The table must
/// have a free slot.
inline int64_t table_slot(uint64_t* table, int64_t cap, uint64_t key) {
  if (key == ~uint64_t(0)) {
    atomic_u64(table[cap]).store(1);
    return cap;
  }
  const uint64_t stored = key + 1;
  int64_t i = static_cast<int64_t>(ffn::kernels::reconcile::mix64(key) &
                                   static_cast<uint64_t>(cap - 1));
  while (true) {
    atomic_u64 slot(table[i]);
    uint64_t cur = slot.load();
    if (cur == 0) {
      if (slot.compare_exchange_strong(cur, stored)) return i;
    }
    if (cur == stored) return i;
    i = (i + 1) & (cap - 1);
  }
}

}  // namespace ffn_sycl

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_count_pairs_starts(const uint64_t* a, const uint64_t* b, int64_t n, uint8_t* start) {
  const int64_t i = ffn_sycl::global_id();
  if (i < n) start[i] = (i == 0 || a[i] != a[i - 1] || b[i] != b[i - 1]) ? 1 : 0;
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_count_pairs_insert(const uint64_t* a, const uint64_t* b, int64_t n, const uint8_t* start,
                            uint64_t* table_a, int64_t cap_a, uint64_t* table_b, int64_t cap_b,
                            uint64_t* table_pairs, int64_t cap_pairs, uint64_t* counts) {
  const int64_t i = ffn_sycl::global_id();
  if (i >= n || !start[i]) return;
  int64_t j = i + 1;
  while (j < n && !start[j]) ++j;
  const int64_t sa = ffn_sycl::table_slot(table_a, cap_a, a[i]);
  const int64_t sb = ffn_sycl::table_slot(table_b, cap_b, b[i]);
  const uint64_t key = static_cast<uint64_t>(sa) * static_cast<uint64_t>(cap_b + 1) +
                       static_cast<uint64_t>(sb);
  const int64_t sp = ffn_sycl::table_slot(table_pairs, cap_pairs, key);
  ffn_sycl::atomic_u64(counts[sp]).fetch_add(static_cast<uint64_t>(j - i));
}

// ------------------------------------------------------------- union-find
//
// kernels/union_find.hpp links roots serially (each union depends on the
// earlier ones), which no device runs in parallel.  Device algorithm
// (hooking + pointer jumping, as in Shiloach-Vishkin / ECL-CC): the host
// sorts and deduplicates the ids (the same sort as count_pairs' pairs), then
//   ffn_uf_index    edge end: its index in the sorted ids (binary search);
//   ffn_uf_hook     edge: the roots ra, rb of its ends; if they differ, the
//                   larger one's parent becomes min(parent, smaller) (atomic
//                   min) and `changed` is set;
//   ffn_uf_compress index: parent = its root (pointer jumping);
// repeated until no edge changes anything.  Parents only decrease and
// parent[i] <= i, so there are no cycles and every tree's root is its
// smallest index, i.e. the smallest id of the component: the CPU result,
// whatever the order of the work-items.  An atomic min that re-parents a
// node which was no longer a root may cut the tree it hung from; the edge
// that joined them is seen again in the next round, which is why the loop
// runs until a round changes nothing.

namespace ffn_sycl {

using atomic_i64 = sycl::atomic_ref<int64_t, sycl::memory_order::relaxed,
                                    sycl::memory_scope::device,
                                    sycl::access::address_space::global_space>;

inline int64_t uf_root(int64_t* parent, int64_t x) {
  while (true) {
    const int64_t p = atomic_i64(parent[x]).load();
    if (p == x) return x;
    x = p;
  }
}

}  // namespace ffn_sycl

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_uf_index(const uint64_t* ends, int64_t n_ends, const uint64_t* ids, int64_t n_ids,
                  int64_t* index) {
  const int64_t i = ffn_sycl::global_id();
  if (i >= n_ends) return;
  index[i] = ffn::kernels::reconcile::lower_bound_index(ids, n_ids, ends[i]);  // (the id is present)
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_uf_hook(const int64_t* index, int64_t m, int64_t* parent, uint32_t* changed) {
  const int64_t e = ffn_sycl::global_id();
  if (e >= m) return;
  const int64_t ra = ffn_sycl::uf_root(parent, index[2 * e]);
  const int64_t rb = ffn_sycl::uf_root(parent, index[2 * e + 1]);
  if (ra == rb) return;
  const int64_t lo = ra < rb ? ra : rb, hi = ra < rb ? rb : ra;
  ffn_sycl::atomic_i64(parent[hi]).fetch_min(lo);
  sycl::atomic_ref<uint32_t, sycl::memory_order::relaxed, sycl::memory_scope::device,
                   sycl::access::address_space::global_space>(*changed)
      .store(1u);
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_uf_compress(int64_t* parent, int64_t n) {
  const int64_t i = ffn_sycl::global_id();
  if (i < n) ffn_sycl::atomic_i64(parent[i]).store(ffn_sycl::uf_root(parent, i));
}

// ---------------------------------------------------------- object commit
//
// kernels/fov_update.hpp's commit_count_new / commit_claim walk the box in
// raster order, the claim appending (id, run length) runs.  On a device one
// work-item per box row (z, y) runs them on a 1 x 1 x bx box: counts per row
// (summed on the host), then the claim with its runs in the row's own slice
// of the run buffers (bx entries per row); the host merges the runs of all
// rows by id (the CPU binding merges its runs by id too: the same ids and
// counts).  Rows are disjoint, so the writes of new_id never race.

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_commit_count(const float* logits, int64_t lsz, int64_t lsy, const int32_t* seg,
                      int64_t ssz, int64_t ssy, int64_t bz, int64_t by, int64_t bx,
                      float seg_threshold, int64_t* counts) {
  const int64_t row = ffn_sycl::global_id();
  if (row >= bz * by) return;
  const int64_t z = row / by, y = row % by;
  counts[row] = ffn::kernels::commit_count_new(logits + z * lsz + y * lsy, lsz, lsy,
                                               seg + z * ssz + y * ssy, ssz, ssy, 1, 1, bx,
                                               seg_threshold, bx + 1);
}

extern "C" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))
void ffn_commit_claim(const float* logits, int64_t lsz, int64_t lsy, int32_t* seg, int64_t ssz,
                      int64_t ssy, int64_t bz, int64_t by, int64_t bx, float seg_threshold,
                      int32_t new_id, int32_t* run_ids, int64_t* run_lengths, int64_t* n_runs,
                      int64_t* n_new) {
  const int64_t row = ffn_sycl::global_id();
  if (row >= bz * by) return;
  const int64_t z = row / by, y = row % by;
  n_new[row] = ffn::kernels::commit_claim(logits + z * lsz + y * lsy, lsz, lsy,
                                          seg + z * ssz + y * ssy, ssz, ssy, 1, 1, bx,
                                          seg_threshold, new_id, run_ids + row * bx,
                                          run_lengths + row * bx, n_runs + row);
}
