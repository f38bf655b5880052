// SPDX-License-Identifier: Apache-2.0
//
// CPU launcher: runs the kernel bodies of kernels/*.hpp with OpenMP (or
// serially when the extension was built without OpenMP).  No Python here:
// the bindings (csrc/bind_*.cpp) validate arguments and call these.
#pragma once

#include <cstdint>
#include <exception>
#include <utility>
#include <vector>

#include "kernels/fov_update.hpp"
#include "kernels/peaks.hpp"
#include "kernels/count_pairs.hpp"
#include "kernels/relabel.hpp"
#include "kernels/union_find.hpp"

#ifdef FFN_HAVE_OPENMP
#include <omp.h>
#endif

namespace ffn {
namespace launch {

/// Whether the extension was built with OpenMP.
bool have_openmp();
/// Threads used by the parallel kernels (>= 1).
int num_threads();
/// Set the threads used by the parallel kernels; n <= 0 restores the default
/// (OpenMP's omp_get_max_threads() at import time).  Without OpenMP: always 1.
void set_num_threads(int n);
/// Minimum elements per parallel chunk (default 2^21; n <= 0 restores it).
/// Returns the previous value.  Lowered by the tests to exercise the
/// multi-threaded paths on small inputs.
int64_t set_parallel_grain(int64_t n);

/// Run f(i) for i in [0, n) on up to `threads` threads (static schedule:
/// chunk i always covers the same work).  Exceptions thrown by f are
/// re-thrown on the calling thread after the loop.
template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
#ifdef FFN_HAVE_OPENMP
  if (n > 1 && threads > 1) {
    std::exception_ptr err = nullptr;
    const int t = static_cast<int>(n < threads ? n : threads);
#pragma omp parallel for num_threads(t) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      try {
        f(i);
      } catch (...) {
#pragma omp critical(ffn_parallel_for_error)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  (void)threads;
  for (int64_t i = 0; i < n; ++i) f(i);
}

// ---------------------------------------------------------------- FOV update

/// One FOV target: a C-contiguous float32 canvas and a FOV centre in it
/// (already checked to keep the box inside the canvas).
struct FovTarget {
  float* canvas;
  int64_t shape[3];
  int64_t center[3];
};

/// Pointer to the canvas element at the FOV box origin (centre - f/2).
inline float* box_origin(const FovTarget& t, const int64_t f[3]) {
  return t.canvas + ((t.center[0] - f[0] / 2) * t.shape[1] + (t.center[1] - f[1] / 2)) *
                        t.shape[2] +
         (t.center[2] - f[2] / 2);
}

/// update_fovs: logits (K, f) are written (after the disco rule) into their
/// canvases; scores (K, 6) and offsets (K, 6, 3) receive the face maxima.
/// `parallel` must be false when two targets share canvas memory.
void update_fovs(const FovTarget* targets, int64_t k, float* logits, const int64_t f[3],
                 float move_threshold, double disco_seed_threshold,
                 const int64_t deltas[3], float* scores, int64_t* offsets, bool parallel);

/// gather_fovs: out[k] = canvas box of target k, NaN -> pad_value.
void gather_fovs(const FovTarget* targets, int64_t k, float* out, const int64_t f[3],
                 float pad_value);

/// Object commit over a box (`logits` and `seg` point at the box origin; row
/// strides lsz, lsy and ssz, ssy): the new voxels (counted only up to
/// min_size unless there are that many, then claimed with new_id) and the
/// labelled ids under the object's mask with their voxel counts, sorted by id.
struct CommitResult {
  int64_t n_new = 0;
  std::vector<std::pair<int32_t, int64_t>> overlaps;
};
CommitResult commit_object(const float* logits, int64_t lsz, int64_t lsy, int32_t* seg,
                           int64_t ssz, int64_t ssy, const int64_t size[3], float seg_threshold,
                           int64_t min_size, int32_t new_id);

// -------------------------------------------------------------------- peaks

/// Peak finding; returns the accepted linear indices in raster order.
/// Sets *has_nan (and returns nothing) when the image contains NaN.
std::vector<int64_t> find_peaks(const float* image, const int64_t shape[3],
                                int64_t min_distance, float threshold,
                                const int64_t border[3], bool* has_nan);
std::vector<int64_t> find_peaks(const double* image, const int64_t shape[3],
                                int64_t min_distance, double threshold,
                                const int64_t border[3], bool* has_nan);

// ---------------------------------------------------------------- reconcile

using PairSlot = kernels::reconcile::PairCountMap::Slot;

/// Every distinct (a, b) pair over n voxels of two label arrays (bits 32 or
/// 64 each) with its count, sorted by (a, b); threads from a grain of voxels
/// per thread (set_count_pairs_grain; n <= 0 restores the default 2^21,
/// returns the previous value).
std::vector<PairSlot> count_pairs(const void* a, int a_bits, const void* b, int b_bits, int64_t n,
                                  bool ignore_zero);
int64_t set_count_pairs_grain(int64_t n);

/// In-place relabel of n labels (bits 32 or 64) through sorted unique keys.
void relabel(void* labels, int bits, int64_t n, const uint64_t* keys,
             const uint64_t* values, int64_t nkeys);

}  // namespace launch
}  // namespace ffn
