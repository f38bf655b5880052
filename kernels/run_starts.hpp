// SPDX-License-Identifier: Apache-2.0
//
// Run-start scan of count_pairs (count_pairs.hpp): within a block of voxels,
// the positions where the (a, b) label pair differs from the previous
// voxel's, so that a run of identical consecutive pairs costs one counter
// update.
//
//   * run_starts_scalar: portable and branch-free (a data-dependent branch
//     per voxel would mispredict at most run ends): one store per voxel, the
//     output index advanced by the comparison.
//   * run_starts_avx2 (x86-64 with GCC or Clang, unless FFN_NO_MULTIVERSIONING
//     is defined; defines FFN_RECONCILE_AVX2): the equality tests of 64 voxels
//     (AVX2 compares of 8 labels at a time) make one bit mask whose set bits
//     are the run starts.  Compiled through target attributes and chosen at
//     run time (__builtin_cpu_supports) by PairCounter::count_range.
//   * scan_simd_allowed: process-wide atomic switch, so that the tests can
//     check the portable scan (floodfilling._kernels._set_count_pairs_simd).
//
// O(n) for n voxels; no allocation, no threads.  Both scans list the same run
// starts, so count_pairs' result, which must agree exactly with
// floodfilling.kernels_reference.count_pairs_reference, does not depend on
// which one ran.
//
// Header-only C++17, no Python, no I/O, no exceptions (allocation failures
// aside).  Labels are unsigned integers (uint32 or uint64); arrays are flat
// C-order spans (the label arrays may have any ndim: only the flat order
// matters here).  Namespace ffn::kernels::reconcile, shared by the
// overlap-reconciliation family: count_pairs.hpp (with run_starts.hpp,
// dense_scratch.hpp, sparse_pair_count.hpp), union_find.hpp, relabel.hpp.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace ffn {
namespace kernels {
namespace reconcile {

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

}  // namespace reconcile
}  // namespace kernels
}  // namespace ffn
