// SPDX-License-Identifier: Apache-2.0
//
// Bindings of the FOV update family: update_fovs, gather_fovs, commit_object.
// These run once per inference step, so the argument checks are done here in
// C++ (a few hundred nanoseconds) rather than in Python.
#include <algorithm>
#include <array>
#include <cstdint>
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
  int64_t f[3];
  py::array logits = check_update_logits(logits_obj, deltas, f);
  const int64_t k = logits.shape(0);
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

// Object commit (see floodfilling.kernels.commit_object): returns
// (new voxels, overlapped ids int64 sorted, their voxel counts); writes new_id
// only when new voxels >= min_size.
py::tuple commit_object(py::handle logits_obj, std::array<int64_t, 3> logits_start,
                        py::handle seg_obj, std::array<int64_t, 3> seg_start,
                        std::array<int64_t, 3> size, double seg_threshold, int64_t min_size,
                        int64_t new_id) {
  py::array L = require_array(logits_obj, "logits");
  if (!has_dtype<float>(L)) fail("logits: expected dtype float32, got " + dtype_str(L));
  require_ndim(L, 3, "logits");
  require_c_contiguous(L, "logits");
  py::array S = require_array(seg_obj, "seg");
  if (!has_dtype<int32_t>(S)) fail("seg: expected dtype int32, got " + dtype_str(S));
  require_ndim(S, 3, "seg");
  require_c_contiguous(S, "seg");
  require_writeable(S, "seg");
  for (int d = 0; d < 3; ++d) {
    if (size[d] < 0) fail("size: must be >= 0 on every axis");
    if (logits_start[d] < 0 || logits_start[d] + size[d] > L.shape(d))
      fail("logits_start: box does not fit logits of shape " + shape_str(L));
    if (seg_start[d] < 0 || seg_start[d] + size[d] > S.shape(d))
      fail("seg_start: box does not fit seg of shape " + shape_str(S));
  }
  if (new_id < 1 || new_id > INT32_MAX) fail("new_id: must lie in [1, 2^31 - 1]");
  const int64_t lsz = L.shape(1) * L.shape(2), lsy = L.shape(2);
  const int64_t ssz = S.shape(1) * S.shape(2), ssy = S.shape(2);
  const float* lp = static_cast<const float*>(L.data()) + logits_start[0] * lsz +
                    logits_start[1] * lsy + logits_start[2];
  int32_t* sp = static_cast<int32_t*>(S.mutable_data()) + seg_start[0] * ssz +
                seg_start[1] * ssy + seg_start[2];
  launch::CommitResult res;
  {
    py::gil_scoped_release release;
    res = launch::commit_object(lp, lsz, lsy, sp, ssz, ssy, size.data(),
                                static_cast<float>(seg_threshold), min_size,
                                static_cast<int32_t>(new_id));
  }
  const auto& merged = res.overlaps;
  const int64_t m = static_cast<int64_t>(merged.size());
  py::array_t<int64_t> out_ids(m), out_counts(m);
  for (int64_t i = 0; i < m; ++i) {
    out_ids.mutable_data()[i] = merged[i].first;
    out_counts.mutable_data()[i] = merged[i].second;
  }
  return py::make_tuple(res.n_new, std::move(out_ids), std::move(out_counts));
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
  m.def("commit_object", &commit_object, py::arg("logits"), py::arg("logits_start"),
        py::arg("seg"), py::arg("seg_start"), py::arg("size"), py::arg("seg_threshold"),
        py::arg("min_size"), py::arg("new_id"),
        "Object commit over a box: (new voxels, overlapped ids, counts); writes new_id to "
        "the new voxels when there are >= min_size. See floodfilling.kernels.commit_object.");
}

}  // namespace bind
}  // namespace ffn
