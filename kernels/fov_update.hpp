// SPDX-License-Identifier: Apache-2.0
//
// FOV update kernel bodies: the per-step hot path of flood-filling inference.
//
// Header-only C++17, no Python, no I/O, no exceptions, no allocation: plain
// functions over raw pointers so that the OpenMP launcher (csrc/launch_omp.cpp)
// and the SYCL kernels (sycl/kernels.cpp) share them.
//
// Geometry
// --------
// All arrays are indexed (z, y, x) and stored C-contiguously (x fastest).
//
//   * A canvas is a float32 volume of shape (cz, cy, cx) holding logits
//     (NaN = never predicted).  Its element strides are (cy*cx, cx, 1).
//   * A FOV has odd shape (fz, fy, fx); its centre index inside the FOV is
//     c = (fz/2, fy/2, fx/2).  A FOV centred at canvas position p covers the
//     box  p - f/2 .. p + f/2  (inclusive) of the canvas.  The launchers pass
//     a pointer to the canvas element at the box origin p - f/2; callers must
//     have checked that the box lies inside the canvas.
//   * Movement faces.  With deltas d = (dz, dy, dx) (0 <= d <= f/2), the six
//     face candidates are, in this fixed order:
//        0: axis z, offset -dz     1: axis z, offset +dz
//        2: axis y, offset -dy     3: axis y, offset +dy
//        4: axis x, offset -dx     5: axis x, offset +dx
//     The face for axis a and offset o is the plane at FOV index c[a] + o,
//     restricted to c[b] - d[b] .. c[b] + d[b] (inclusive) along each of the
//     two other axes b (a 17 x 17 plane for d = 8), scanned in C order (the
//     lower remaining axis is the outer loop).  Its score is the first maximum
//     in that order with np.argmax semantics: the first NaN, if any, wins;
//     otherwise the first element not exceeded by any later one (ties and
//     +0/-0 keep the earlier element).  The offset is the argmax position
//     relative to the FOV centre, (dz, dy, dx), with the moving axis equal to o.
//     An axis whose delta is 0 has no faces: both scores are -inf and both
//     offsets are (0, 0, 0).
//
// Disco rule (applied before the write when enabled):
//   if count(logits >= move_threshold) / n > disco_seed_threshold then,
//   wherever old < 0 (= logit(0.5)) and new > old, new := old.
//   NaN old values never match (all comparisons with NaN are false).
//   The resulting values overwrite the canvas box AND the FOV logits buffer.
#pragma once

#include <cstdint>
#include <limits>

#include "common.hpp"

// Software prefetch (host compilers only; a no-op in SYCL device code).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__SYCL_DEVICE_ONLY__)
#define FFN_PREFETCH(ptr, rw) __builtin_prefetch((ptr), (rw), 3)
#else
#define FFN_PREFETCH(ptr, rw) ((void)0)
#endif

namespace ffn {
namespace kernels {

/// Prefetch the canvas box (fz x fy rows of fx floats) into the caches.  The
/// rows of a FOV box are short (33 floats) and far apart (one canvas row /
/// plane), which defeats the hardware prefetchers: issuing every row up front
/// lets the memory system fetch them in parallel while the FOV's own buffer
/// is being scanned.  `for_write` requests the lines in exclusive state.
FFN_KERNEL_INLINE void prefetch_box(const float* box, int64_t sz, int64_t sy, int64_t fz, int64_t fy,
                         int64_t fx, bool for_write) {
  const int64_t bytes = fx * static_cast<int64_t>(sizeof(float));
  for (int64_t z = 0; z < fz; ++z) {
    for (int64_t y = 0; y < fy; ++y) {
      const char* row = reinterpret_cast<const char*>(box + z * sz + y * sy);
      for (int64_t b = 0; b < bytes; b += 64) {
        if (for_write)
          FFN_PREFETCH(row + b, 1);
        else
          FFN_PREFETCH(row + b, 0);
      }
      if (for_write)
        FFN_PREFETCH(row + bytes - 1, 1);
      else
        FFN_PREFETCH(row + bytes - 1, 0);
    }
  }
}

/// Number of values v[i] >= thr among n floats (NaN never counts).
FFN_KERNEL_INLINE int64_t count_at_least(const float* v, int64_t n, float thr) {
  int64_t total = 0;
  // Blocked int32 accumulation keeps the inner loop vectorisable.
  const int64_t block = 1 << 20;
  for (int64_t s = 0; s < n; s += block) {
    const int64_t e = (n - s < block) ? n : s + block;
    int32_t c = 0;
    for (int64_t i = s; i < e; ++i) c += (v[i] >= thr) ? 1 : 0;
    total += c;
  }
  return total;
}

/// Smallest count c in [0, n] with (double)c / (double)n > t, i.e. the number
/// of voxels >= move_threshold that activates the disco rule (the same double
/// comparison as the reference's mean(...) > t); n + 1 when no count does.
/// Requires 0 <= t and n > 0.
inline int64_t disco_count_needed(int64_t n, double t) {
  const double dn = static_cast<double>(n);
  if (!(t < 1.0)) return n + 1;  // c / n <= 1 is never > t
  int64_t c = static_cast<int64_t>(t * dn);  // in [0, n - 1]
  while (c > 0 && static_cast<double>(c - 1) / dn > t) --c;
  while (c <= n && !(static_cast<double>(c) / dn > t)) ++c;
  return c;
}

/// Whether the disco rule is active for this FOV: mean(fov >= move_threshold)
/// > disco_seed_threshold; disco_seed_threshold < 0 (or NaN) disables it.
/// The count stops as soon as it reaches the activating number, and starts at
/// the middle of the FOV, where an object seeded at the centre is most likely
/// above threshold (the order of a count does not change it).
FFN_KERNEL_INLINE bool disco_active(const float* fov, int64_t n, float move_threshold,
                         double disco_seed_threshold) {
  if (!(disco_seed_threshold >= 0.0) || n <= 0) return false;
  const int64_t need = disco_count_needed(n, disco_seed_threshold);
  if (need > n) return false;
  if (need <= 0) return true;
  const int64_t block = 2048;
  int64_t cnt = 0;
  for (int half = 0; half < 2; ++half) {
    const int64_t lo = half == 0 ? n / 2 : 0;
    const int64_t hi = half == 0 ? n : n / 2;
    for (int64_t s = lo; s < hi; s += block) {
      const int64_t e = (hi - s < block) ? hi : s + block;
      cnt += count_at_least(fov + s, e - s, move_threshold);
      if (cnt >= need) return true;
    }
  }
  return false;
}

/// Write a FOV of shape (fz, fy, fx) into the canvas box whose origin element
/// is `box` (canvas strides sz = cy*cx, sy = cx, x stride 1).  With `disco`,
/// apply the disco rule first.  `fov` is overwritten with the values written.
FFN_KERNEL_INLINE void write_fov(float* box, int64_t sz, int64_t sy, float* fov, int64_t fz,
                      int64_t fy, int64_t fx, bool disco) {
  for (int64_t z = 0; z < fz; ++z) {
    for (int64_t y = 0; y < fy; ++y) {
      float* __restrict c = box + z * sz + y * sy;
      float* __restrict f = fov + (z * fy + y) * fx;
      if (disco) {
        // The FOV buffer only needs rewriting where the rule kept an old
        // value: rows without a replacement are left untouched (no store).
        int replaced = 0;
        for (int64_t x = 0; x < fx; ++x) {
          const float o = c[x];
          const float nv = f[x];
          const bool keep_old = o < 0.0f && nv > o;
          c[x] = keep_old ? o : nv;
          replaced |= keep_old ? 1 : 0;
        }
        if (replaced)
          for (int64_t x = 0; x < fx; ++x) f[x] = c[x];
      } else {
        for (int64_t x = 0; x < fx; ++x) c[x] = f[x];
      }
    }
  }
}

/// First maximum (np.argmax semantics) of a 2-D strided plane of n0 x n1
/// elements starting at `base` (strides s0, s1 in elements).
/// Returns the score; writes the (i0, i1) position.  n0, n1 >= 1.
FFN_KERNEL_INLINE float plane_argmax(const float* base, int64_t n0, int64_t s0, int64_t n1,
                          int64_t s1, int64_t* i0, int64_t* i1) {
  float best = base[0];
  int64_t b0 = 0, b1 = 0;
  if (best != best) {  // NaN first: it wins
    *i0 = 0;
    *i1 = 0;
    return best;
  }
  for (int64_t a = 0; a < n0; ++a) {
    const float* row = base + a * s0;
    for (int64_t b = 0; b < n1; ++b) {
      const float v = row[b * s1];
      if (v != v) {  // first NaN wins
        *i0 = a;
        *i1 = b;
        return v;
      }
      if (v > best) {
        best = v;
        b0 = a;
        b1 = b;
      }
    }
  }
  *i0 = b0;
  *i1 = b1;
  return best;
}

/// The six face maxima of a FOV (see the geometry notes at the top).
/// scores: 6 floats; offsets: 6 x 3 int64 (row-major), (dz, dy, dx) each.
FFN_KERNEL_INLINE void face_maxima(const float* fov, int64_t fz, int64_t fy, int64_t fx,
                        const int64_t deltas[3], float* scores, int64_t* offsets) {
  const int64_t stride[3] = {fy * fx, fx, 1};
  const int64_t c[3] = {fz / 2, fy / 2, fx / 2};
  for (int a = 0; a < 3; ++a) {
    // The two remaining axes in increasing order: outer b0, inner b1.
    const int b0 = (a == 0) ? 1 : 0;
    const int b1 = (a == 2) ? 1 : 2;
    for (int side = 0; side < 2; ++side) {
      const int face = 2 * a + side;
      int64_t* off = offsets + 3 * face;
      if (deltas[a] == 0) {
        scores[face] = -std::numeric_limits<float>::infinity();
        off[0] = off[1] = off[2] = 0;
        continue;
      }
      const int64_t o = side == 0 ? -deltas[a] : deltas[a];
      const float* base = fov + (c[a] + o) * stride[a] +
                          (c[b0] - deltas[b0]) * stride[b0] +
                          (c[b1] - deltas[b1]) * stride[b1];
      int64_t i0 = 0, i1 = 0;
      scores[face] = plane_argmax(base, 2 * deltas[b0] + 1, stride[b0],
                                  2 * deltas[b1] + 1, stride[b1], &i0, &i1);
      off[a] = o;
      off[b0] = i0 - deltas[b0];
      off[b1] = i1 - deltas[b1];
    }
  }
}

/// One complete FOV update: disco decision, write, face maxima.
/// `box` is the canvas element at the FOV box origin (centre - f/2).
FFN_KERNEL_INLINE void update_fov(float* box, int64_t sz, int64_t sy, float* fov, int64_t fz,
                       int64_t fy, int64_t fx, float move_threshold,
                       double disco_seed_threshold, const int64_t deltas[3],
                       float* scores, int64_t* offsets) {
  prefetch_box(box, sz, sy, fz, fy, fx, true);
  const bool disco =
      disco_active(fov, fz * fy * fx, move_threshold, disco_seed_threshold);
  write_fov(box, sz, sy, fov, fz, fy, fx, disco);
  face_maxima(fov, fz, fy, fx, deltas, scores, offsets);
}

/// Gather one FOV: out = canvas box with NaN replaced by pad_value.
FFN_KERNEL_INLINE void gather_fov(const float* box, int64_t sz, int64_t sy, float* out,
                       int64_t fz, int64_t fy, int64_t fx, float pad_value) {
  if (fz * fy > 1) prefetch_box(box, sz, sy, fz, fy, fx, false);
  for (int64_t z = 0; z < fz; ++z) {
    for (int64_t y = 0; y < fy; ++y) {
      const float* __restrict c = box + z * sz + y * sy;
      float* __restrict o = out + (z * fy + y) * fx;
      for (int64_t x = 0; x < fx; ++x) {
        const float v = c[x];
        o[x] = (v != v) ? pad_value : v;
      }
    }
  }
}

/// Object commit, pass 1: the voxels of a box with logit >= seg_threshold whose
/// segment is free (<= 0: unlabelled or a rejected-seed mark).  `L` and `S` point
/// at the box origin in their arrays (row strides lsz, lsy and ssz, ssy; x stride 1).
/// The count stops after the row where it reaches `limit` (the caller only needs to
/// know whether the object is large enough; commit_claim counts them all).
FFN_KERNEL_INLINE int64_t commit_count_new(const float* L, int64_t lsz, int64_t lsy,
                                const int32_t* S, int64_t ssz, int64_t ssy, int64_t bz,
                                int64_t by, int64_t bx, float seg_threshold,
                                int64_t limit) {
  int64_t n = 0;
  for (int64_t z = 0; z < bz; ++z)
    for (int64_t y = 0; y < by; ++y) {
      if (n >= limit) return n;
      const float* __restrict l = L + z * lsz + y * lsy;
      const int32_t* __restrict s = S + z * ssz + y * ssy;
      for (int64_t x = 0; x < bx; ++x)
        n += static_cast<int64_t>((l[x] >= seg_threshold) & (s[x] <= 0));
    }
  return n;
}

/// Object commit, pass 2: give `new_id` to those voxels (returns how many), and
/// append the labelled ones under the mask (segment > 0) as (id, run length) runs
/// of consecutive equal ids (the caller merges runs of the same id).
FFN_KERNEL_INLINE int64_t commit_claim(const float* L, int64_t lsz, int64_t lsy, int32_t* S,
                         int64_t ssz, int64_t ssy, int64_t bz, int64_t by, int64_t bx,
                         float seg_threshold, int32_t new_id, int32_t* run_ids,
                         int64_t* run_lengths, int64_t* n_runs) {
  int64_t k = 0, n_new = 0;
  int32_t last = 0;
  for (int64_t z = 0; z < bz; ++z)
    for (int64_t y = 0; y < by; ++y) {
      const float* __restrict l = L + z * lsz + y * lsy;
      int32_t* __restrict s = S + z * ssz + y * ssy;
      for (int64_t x = 0; x < bx; ++x) {
        if (!(l[x] >= seg_threshold)) continue;
        const int32_t v = s[x];
        if (v <= 0) {
          s[x] = new_id;
          ++n_new;
        } else if (k > 0 && v == last) {
          ++run_lengths[k - 1];
        } else {
          run_ids[k] = v;
          run_lengths[k] = 1;
          last = v;
          ++k;
        }
      }
    }
  *n_runs = k;
  return n_new;
}

}  // namespace kernels
}  // namespace ffn
