// SPDX-License-Identifier: Apache-2.0
//
// Bindings of the FOV update family: update_fovs, gather_fovs.
// These run once per inference step, so the argument checks are done here in
// C++ (a few hundred nanoseconds) rather than in Python.
#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include <pybind11/stl.h>

#include "csrc/bind_common.hpp"
#include "csrc/fov_args.hpp"
#include "csrc/launch_omp.hpp"

namespace ffn {
namespace bind {

namespace {

using launch::FovTarget;

py::tuple update_fovs(py::handle canvases, py::handle logits_obj, py::handle centers,
                      double move_threshold, std::array<int64_t, 3> deltas,
                      double disco_seed_threshold) {
  py::array logits = require_array(logits_obj, "logits");
  if (!has_dtype<float>(logits))
    fail("logits: expected dtype float32, got " + dtype_str(logits));
  require_ndim(logits, 4, "logits");
  require_c_contiguous(logits, "logits");
  require_writeable(logits, "logits");
  const int64_t k = logits.shape(0);
  const int64_t f[3] = {logits.shape(1), logits.shape(2), logits.shape(3)};
  check_fov_size(f, "logits");
  for (int d = 0; d < 3; ++d)
    if (deltas[d] < 0 || deltas[d] > f[d] / 2)
      fail("deltas: each delta must lie in [0, fov_size // 2]; got (" +
           std::to_string(deltas[0]) + ", " + std::to_string(deltas[1]) + ", " +
           std::to_string(deltas[2]) + ") for FOV size " + shape_str(logits));
  std::vector<FovTarget> targets;
  const bool shared = resolve_canvases(canvases, k, true, targets);
  resolve_centers(centers, k, f, targets);
  py::array_t<float> scores({k, int64_t(6)});
  py::array_t<int64_t> offsets({k, int64_t(6), int64_t(3)});
  if (k > 0) {
    float* lp = static_cast<float*>(logits.mutable_data());
    float* sp = scores.mutable_data();
    int64_t* op = offsets.mutable_data();
    const float thr = static_cast<float>(move_threshold);  // IEEE round to nearest
    py::gil_scoped_release release;
    launch::update_fovs(targets.data(), k, lp, f, thr, disco_seed_threshold, deltas.data(),
                        sp, op, /*parallel=*/!shared && k > 1);
  }
  return py::make_tuple(std::move(scores), std::move(offsets));
}

py::array gather_fovs(py::handle canvases, py::handle centers, std::array<int64_t, 3> fov,
                      double pad_value, py::handle out_obj) {
  py::array out = require_array(out_obj, "out");
  if (!has_dtype<float>(out)) fail("out: expected dtype float32, got " + dtype_str(out));
  require_ndim(out, 4, "out");
  require_c_contiguous(out, "out");
  require_writeable(out, "out");
  const int64_t f[3] = {fov[0], fov[1], fov[2]};
  check_fov_size(f, "fov_size");
  if (out.shape(1) != f[0] || out.shape(2) != f[1] || out.shape(3) != f[2])
    fail("out: shape " + shape_str(out) + " does not match fov_size (" +
         std::to_string(f[0]) + ", " + std::to_string(f[1]) + ", " + std::to_string(f[2]) +
         ")");
  const int64_t k = out.shape(0);
  std::vector<FovTarget> targets;
  resolve_canvases(canvases, k, false, targets);
  resolve_centers(centers, k, f, targets);
  if (k > 0) {
    float* op = static_cast<float*>(out.mutable_data());
    const float pad = static_cast<float>(pad_value);
    py::gil_scoped_release release;
    launch::gather_fovs(targets.data(), k, op, f, pad);
  }
  return out;
}

}  // namespace

void bind_fov_update(py::module_& m) {
  m.def("update_fovs", &update_fovs, py::arg("canvases"), py::arg("logits"),
        py::arg("centers"), py::arg("move_threshold"), py::arg("deltas"),
        py::arg("disco_seed_threshold"),
        "Disco-rule write of K FOVs into their canvases + the 6 face maxima.\n"
        "Returns (scores float32 (K, 6), offsets int64 (K, 6, 3)). See "
        "floodfilling.kernels.update_fovs.");
  m.def("gather_fovs", &gather_fovs, py::arg("canvases"), py::arg("centers"),
        py::arg("fov_size"), py::arg("pad_value"), py::arg("out"),
        "out[k] = canvas_k[FOV box at centers[k]] with NaN -> pad_value. Returns out.");
}

}  // namespace bind
}  // namespace ffn
