// SPDX-License-Identifier: Apache-2.0
//
// Peak finding (seed ordering) kernel bodies.
//
// Header-only C++17, no Python, no I/O, no exceptions.  The launcher
// (csrc/launch_omp.cpp) splits the z range between threads, calls
// `filter_slab` on each slab, then, serially, `sort_candidates` and
// `greedy_spacing` (when min_distance > 1) and sorts the accepted linear
// indices (raster order); `indices_to_zyx` writes the (N, 3) result.
//
// Semantics reproduced (scikit-image's peak_local_max with labels=None,
// footprint=None, num_peaks=inf, p_norm=inf):
//   * image: (nz, ny, nx), C order, float or double, no NaN (the binding
//     rejects NaN).  Indices are (z, y, x).
//   * local maximum: image == max over the (2r+1)^3 cube around the voxel with
//     mode 'nearest'.  For a maximum filter, replicating edge voxels adds no
//     new values, so this equals the max over the cube truncated to the
//     image; the filter is separable (x, then y, then z).
//   * if EVERY voxel equals its local maximum (e.g. a constant image) there
//     are no peaks at all (checked before thresholding and border exclusion).
//   * candidate: local maximum, value > threshold (threshold already cast to
//     the image type), and b[a] <= i[a] < n[a] - b[a] along every axis a.
//   * "plain" mode (r == 0 or a single-voxel image): candidate = value >
//     threshold inside the border; no local-maximum test, no trivial check.
//   * spacing (only when min_distance > 1): candidates are visited by
//     descending value, ties in raster order (a stable sort of the raster
//     list); a candidate is dropped when an already accepted one lies at
//     Chebyshev distance < min_distance, otherwise accepted.  (scikit-image
//     processes the list in batches, but each batch re-runs the greedy over
//     the accepted set followed by the batch, which is the same as one
//     global greedy pass.)
//   * output in raster order (ascending linear index).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.hpp"

namespace ffn {
namespace kernels {
namespace peaks {

template <class T>
FFN_KERNEL_INLINE T maxv(T a, T b) {
  return a > b ? a : b;
}

/// out[x] = max(in[x - r .. x + r] truncated to [0, n)).  in != out.
template <class T>
FFN_KERNEL_INLINE void row_max(const T* __restrict in, T* __restrict out, int64_t n, int64_t r) {
  for (int64_t x = 0; x < n; ++x) out[x] = in[x];
  for (int64_t k = 1; k <= r && k < n; ++k) {
    for (int64_t x = 0; x < n - k; ++x) out[x] = maxv(out[x], in[x + k]);
    for (int64_t x = k; x < n; ++x) out[x] = maxv(out[x], in[x - k]);
  }
}

/// dst[i] = max(dst[i], src[i]) for n elements.
template <class T>
FFN_KERNEL_INLINE void accumulate_max(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = maxv(dst[i], src[i]);
}

/// 2-D (y, x) maximum filter of one plane (ny, nx) with radius r:
/// tmp and out are ny*nx buffers, out != plane.
template <class T>
FFN_KERNEL_INLINE void plane_max2d(const T* plane, int64_t ny, int64_t nx, int64_t r,
                        T* __restrict tmp, T* __restrict out) {
  for (int64_t y = 0; y < ny; ++y) row_max(plane + y * nx, tmp + y * nx, nx, r);
  for (int64_t y = 0; y < ny; ++y) {
    const int64_t lo = y - r < 0 ? 0 : y - r;
    const int64_t hi = y + r > ny - 1 ? ny - 1 : y + r;
    T* o = out + y * nx;
    std::memcpy(o, tmp + lo * nx, sizeof(T) * nx);
    for (int64_t yy = lo + 1; yy <= hi; ++yy) accumulate_max(o, tmp + yy * nx, nx);
  }
}

/// A peak candidate: linear index (raster) and value.
template <class T>
struct Candidate {
  int64_t index;
  T value;
};

/// Per-slab scratch memory for `filter_slab` (owned by the launcher thread).
template <class T>
struct SlabScratch {
  std::vector<T> tmp;     // ny*nx
  std::vector<T> ring;    // (2r+1) * ny*nx : 2-D maxima of planes
  std::vector<int64_t> tag;  // which z each ring slot holds (-1 = none)
  std::vector<T> zmax;    // nx
};

/// Result flags of one slab.
struct SlabFlags {
  bool has_nan = false;
  bool has_non_max = false;  // some voxel differs from its local maximum
};

/// Scan planes z0 <= z < z1 of the image (nz, ny, nx): append candidates in
/// raster order to `out`.  border: widths (bz, by, bx).  r = min_distance.
/// plain: see header notes.
template <class T>
FFN_KERNEL_INLINE SlabFlags filter_slab(const T* image, int64_t nz, int64_t ny, int64_t nx,
                             int64_t r, T threshold, const int64_t border[3],
                             bool plain, int64_t z0, int64_t z1,
                             SlabScratch<T>& s, std::vector<Candidate<T>>& out) {
  SlabFlags flags;
  const int64_t plane = ny * nx;
  const int64_t ylo = border[1], yhi = ny - border[1];
  const int64_t xlo = border[2], xhi = nx - border[2];
  if (plain) {
    for (int64_t z = z0; z < z1; ++z) {
      const bool zin = z >= border[0] && z < nz - border[0];
      for (int64_t y = 0; y < ny; ++y) {
        const T* row = image + z * plane + y * nx;
        const bool yin = zin && y >= ylo && y < yhi;
        for (int64_t x = 0; x < nx; ++x) {
          const T v = row[x];
          if (v != v) flags.has_nan = true;
          if (yin && x >= xlo && x < xhi && v > threshold)
            out.push_back({z * plane + y * nx + x, v});
        }
      }
    }
    return flags;
  }
  // Ring of 2-D maxima: the (truncated) z window never holds more than
  // min(2r + 1, nz) consecutive planes, so slot zz % w is unique within it.
  const int64_t w = (2 * r + 1 < nz) ? 2 * r + 1 : nz;
  s.tmp.resize(plane);
  s.ring.resize(static_cast<size_t>(w * plane));
  s.tag.assign(static_cast<size_t>(w), -1);
  s.zmax.resize(nx);
  for (int64_t z = z0; z < z1; ++z) {
    const int64_t lo = z - r < 0 ? 0 : z - r;
    const int64_t hi = z + r > nz - 1 ? nz - 1 : z + r;
    for (int64_t zz = lo; zz <= hi; ++zz) {
      const int64_t slot = zz % w;
      if (s.tag[slot] != zz) {
        plane_max2d(image + zz * plane, ny, nx, r, s.tmp.data(),
                    s.ring.data() + slot * plane);
        s.tag[slot] = zz;
      }
    }
    const bool zin = z >= border[0] && z < nz - border[0];
    for (int64_t y = 0; y < ny; ++y) {
      T* m = s.zmax.data();
      std::memcpy(m, s.ring.data() + (lo % w) * plane + y * nx, sizeof(T) * nx);
      for (int64_t zz = lo + 1; zz <= hi; ++zz)
        accumulate_max(m, s.ring.data() + (zz % w) * plane + y * nx, nx);
      const T* row = image + z * plane + y * nx;
      // Vectorisable flag scan: any NaN, any voxel below its maximum.
      int nan_or_lower = 0;
      for (int64_t x = 0; x < nx; ++x) nan_or_lower |= (row[x] == m[x]) ? 0 : 1;
      if (nan_or_lower) {
        for (int64_t x = 0; x < nx; ++x) {
          if (row[x] != row[x]) flags.has_nan = true;
          if (row[x] != m[x]) flags.has_non_max = true;
        }
      }
      if (!(zin && y >= ylo && y < yhi)) continue;
      for (int64_t x = xlo; x < xhi; ++x) {
        const T v = row[x];
        if (v == m[x] && v > threshold) out.push_back({z * plane + y * nx + x, v});
      }
    }
  }
  return flags;
}

/// Sort candidates by descending value, ties by ascending raster index
/// (= numpy's stable argsort of -value over the raster-ordered list).
template <class T>
inline void sort_candidates(std::vector<Candidate<T>>& c) {
  std::sort(c.begin(), c.end(), [](const Candidate<T>& a, const Candidate<T>& b) {
    if (a.value > b.value) return true;
    if (b.value > a.value) return false;
    return a.index < b.index;
  });
}

/// Greedy minimum-spacing selection over candidates sorted by `sort_candidates`.
/// A candidate is rejected when an accepted one lies at Chebyshev distance
/// < d (d = min_distance >= 2).  Returns the accepted linear indices (in
/// acceptance order).
///
/// Accepted points are stored in a grid of d x d x d cells: two accepted
/// points are >= d apart along some axis, so a cell holds at most one of them,
/// and any point closer than d lies in one of the 27 surrounding cells.
template <class T>
inline std::vector<int64_t> greedy_spacing(const std::vector<Candidate<T>>& c,
                                           int64_t nz, int64_t ny, int64_t nx,
                                           int64_t d) {
  std::vector<int64_t> accepted;
  if (c.empty()) return accepted;
  const int64_t gz = (nz + d - 1) / d, gy = (ny + d - 1) / d, gx = (nx + d - 1) / d;
  std::vector<int32_t> grid(static_cast<size_t>(gz * gy * gx), -1);
  std::vector<int64_t> pz, py, px;
  const int64_t plane = ny * nx;
  for (const auto& cand : c) {
    const int64_t z = cand.index / plane;
    const int64_t y = (cand.index / nx) % ny;
    const int64_t x = cand.index % nx;
    const int64_t cz = z / d, cy = y / d, cx = x / d;
    bool ok = true;
    for (int64_t a = (cz > 0 ? cz - 1 : 0); ok && a <= cz + 1 && a < gz; ++a) {
      for (int64_t b = (cy > 0 ? cy - 1 : 0); ok && b <= cy + 1 && b < gy; ++b) {
        for (int64_t e = (cx > 0 ? cx - 1 : 0); e <= cx + 1 && e < gx; ++e) {
          const int32_t k = grid[(a * gy + b) * gx + e];
          if (k < 0) continue;
          const int64_t dz = pz[k] > z ? pz[k] - z : z - pz[k];
          const int64_t dy = py[k] > y ? py[k] - y : y - py[k];
          const int64_t dx = px[k] > x ? px[k] - x : x - px[k];
          if (dz < d && dy < d && dx < d) {
            ok = false;
            break;
          }
        }
      }
    }
    if (!ok) continue;
    grid[(cz * gy + cy) * gx + cx] = static_cast<int32_t>(accepted.size());
    accepted.push_back(cand.index);
    pz.push_back(z);
    py.push_back(y);
    px.push_back(x);
  }
  return accepted;
}

/// Write sorted linear indices as (z, y, x) rows into out (n x 3).
inline void indices_to_zyx(const int64_t* idx, int64_t n, int64_t ny, int64_t nx,
                           int64_t* out) {
  const int64_t plane = ny * nx;
  for (int64_t i = 0; i < n; ++i) {
    out[3 * i + 0] = idx[i] / plane;
    out[3 * i + 1] = (idx[i] / nx) % ny;
    out[3 * i + 2] = idx[i] % nx;
  }
}

}  // namespace peaks
}  // namespace kernels
}  // namespace ffn
