// SPDX-License-Identifier: Apache-2.0
//
// Argument resolution of the FOV bindings (bind_fov_update.cpp; the SYCL
// backend, python/floodfilling/sycl_backend.py, mirrors them): canvases, centres and FOV
// sizes are checked here, with ValueErrors naming the argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "csrc/bind_common.hpp"
#include "csrc/launch_omp.hpp"

namespace ffn {
namespace bind {

using launch::FovTarget;

/// Raw float pointer of a float32 array.  Canvases are only written through it
/// when `writeable` was checked (update_fovs); gather_fovs only reads.
inline float* mutable_ptr(const py::array& a) {
  return const_cast<float*>(static_cast<const float*>(a.data()));
}

/// Fill targets[k].canvas/shape from `canvases`: a sequence of K 3-D float32
/// C-contiguous arrays, one 3-D array (used for every FOV) or a 4-D array
/// (K, z, y, x).  Returns whether two targets may share memory.
inline bool resolve_canvases(py::handle canvases, int64_t k, bool writeable,
                      std::vector<FovTarget>& targets) {
  targets.resize(static_cast<size_t>(k));
  auto check = [&](const py::array& a, const std::string& name, py::ssize_t ndim) {
    if (!has_dtype<float>(a)) fail(name + ": expected dtype float32, got " + dtype_str(a));
    require_ndim(a, ndim, name);
    require_c_contiguous(a, name);
    if (writeable) require_writeable(a, name);
  };
  if (py::isinstance<py::array>(canvases)) {
    py::array a = py::reinterpret_borrow<py::array>(canvases);
    if (a.ndim() == 4) {
      check(a, "canvases", 4);
      if (a.shape(0) != k)
        fail("canvases: a 4-D canvases array must hold one canvas per FOV: shape " +
             shape_str(a) + " for " + std::to_string(k) + " FOVs");
      const int64_t vol = a.shape(1) * a.shape(2) * a.shape(3);
      float* base = mutable_ptr(a);
      for (int64_t i = 0; i < k; ++i) {
        targets[i].canvas = base + i * vol;
        for (int d = 0; d < 3; ++d) targets[i].shape[d] = a.shape(d + 1);
      }
      return false;
    }
    check(a, "canvases", 3);
    for (int64_t i = 0; i < k; ++i) {
      targets[i].canvas = mutable_ptr(a);
      for (int d = 0; d < 3; ++d) targets[i].shape[d] = a.shape(d);
    }
    return k > 1;
  }
  if (!py::isinstance<py::sequence>(canvases) || py::isinstance<py::str>(canvases))
    fail("canvases: expected a list of 3-D float32 arrays, got " + type_name(canvases));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(canvases);
  if (static_cast<int64_t>(seq.size()) != k)
    fail("canvases: got " + std::to_string(seq.size()) + " canvases for " +
         std::to_string(k) + " FOVs");
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    const std::string name = "canvases[" + std::to_string(i) + "]";
    py::array a = require_array(seq[static_cast<size_t>(i)], name);
    check(a, name, 3);
    targets[i].canvas = mutable_ptr(a);
    for (int d = 0; d < 3; ++d) targets[i].shape[d] = a.shape(d);
    const uintptr_t p = reinterpret_cast<uintptr_t>(a.data());
    ranges[i] = {p, p + static_cast<uintptr_t>(a.nbytes())};
  }
  if (k < 2) return false;
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second || ranges[i].first == ranges[i - 1].first)
      return true;
  return false;
}

/// centers -> (K, 3) int64 values, box checks against each canvas.
inline void resolve_centers(py::handle centers_obj, int64_t k, const int64_t f[3],
                     std::vector<FovTarget>& targets) {
  py::array raw = py::isinstance<py::array>(centers_obj)
                      ? py::reinterpret_borrow<py::array>(centers_obj)
                      : py::array(py::module_::import("numpy").attr("asarray")(centers_obj));
  if (!is_integer(raw) && !(raw.size() == 0 && raw.ndim() == 2))
    fail("centers: expected an integer array, got dtype " + dtype_str(raw));
  if (raw.ndim() != 2 || raw.shape(0) != k || raw.shape(1) != 3)
    fail("centers: expected shape (" + std::to_string(k) + ", 3), got " + shape_str(raw));
  auto c = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(raw);
  if (!c) fail("centers: cannot convert to int64");
  const int64_t* cp = c.data();
  for (int64_t i = 0; i < k; ++i) {
    FovTarget& t = targets[i];
    for (int d = 0; d < 3; ++d) {
      t.center[d] = cp[3 * i + d];
      // uint64 values above INT64_MAX wrap negative and fail here too.
      if (t.center[d] - f[d] / 2 < 0 || t.center[d] + f[d] / 2 >= t.shape[d]) {
        fail("centers[" + std::to_string(i) + "] = (" + std::to_string(cp[3 * i]) + ", " +
             std::to_string(cp[3 * i + 1]) + ", " + std::to_string(cp[3 * i + 2]) +
             "): the FOV box of size (" + std::to_string(f[0]) + ", " +
             std::to_string(f[1]) + ", " + std::to_string(f[2]) +
             ") does not fit inside canvas " + std::to_string(i) + " of shape (" +
             std::to_string(t.shape[0]) + ", " + std::to_string(t.shape[1]) + ", " +
             std::to_string(t.shape[2]) + ")");
      }
    }
  }
}

inline void check_fov_size(const int64_t f[3], const std::string& name) {
  for (int d = 0; d < 3; ++d)
    if (f[d] < 1 || f[d] % 2 == 0)
      fail(name + ": FOV sizes must be odd and >= 1, got (" + std::to_string(f[0]) + ", " +
           std::to_string(f[1]) + ", " + std::to_string(f[2]) + ")");
}

/// The logits argument of update_fovs (every launcher): float32 (K, fz, fy, fx),
/// C-contiguous and writeable (the disco rule writes it), odd FOV sizes, each
/// delta in [0, fov // 2].  Sets f to the FOV size.
inline py::array check_update_logits(py::handle logits_obj, const std::array<int64_t, 3>& deltas,
                                     int64_t f[3]) {
  py::array logits = require_array(logits_obj, "logits");
  if (!has_dtype<float>(logits))
    fail("logits: expected dtype float32, got " + dtype_str(logits));
  require_ndim(logits, 4, "logits");
  require_c_contiguous(logits, "logits");
  require_writeable(logits, "logits");
  for (int d = 0; d < 3; ++d) f[d] = logits.shape(d + 1);
  check_fov_size(f, "logits");
  for (int d = 0; d < 3; ++d)
    if (deltas[d] < 0 || deltas[d] > f[d] / 2)
      fail("deltas: each delta must lie in [0, fov_size // 2]; got (" +
           std::to_string(deltas[0]) + ", " + std::to_string(deltas[1]) + ", " +
           std::to_string(deltas[2]) + ") for FOV size " + shape_str(logits));
  return logits;
}

}  // namespace bind
}  // namespace ffn
