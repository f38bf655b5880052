// SPDX-License-Identifier: Apache-2.0
//
// Bindings of the peak-finding family.  The public semantics (threshold
// handling, exclude_border forms) live in floodfilling.kernels.find_peaks;
// this entry point takes the already resolved threshold and border widths.
#include <pybind11/stl.h>

#include <array>
#include <vector>

#include "csrc/bind_common.hpp"
#include "csrc/launch_omp.hpp"

namespace ffn {
namespace bind {

namespace {

py::array_t<int64_t> find_peaks(py::handle image_obj, int64_t min_distance,
                                double threshold, std::array<int64_t, 3> border) {
  py::array image = require_array(image_obj, "image");
  const bool is_f32 = has_dtype<float>(image);
  if (!is_f32 && !has_dtype<double>(image))
    fail("image: expected dtype float32 or float64, got " + dtype_str(image));
  require_ndim(image, 3, "image");
  require_c_contiguous(image, "image");
  if (min_distance < 0)
    fail("min_distance: must be >= 0, got " + std::to_string(min_distance));
  for (int d = 0; d < 3; ++d)
    if (border[d] < 0) fail("exclude_border: widths must be >= 0");
  const int64_t shape[3] = {image.shape(0), image.shape(1), image.shape(2)};
  std::vector<int64_t> idx;
  bool has_nan = false;
  {
    py::gil_scoped_release release;
    if (is_f32)
      idx = launch::find_peaks(static_cast<const float*>(image.data()), shape, min_distance,
                               static_cast<float>(threshold), border.data(), &has_nan);
    else
      idx = launch::find_peaks(static_cast<const double*>(image.data()), shape,
                               min_distance, threshold, border.data(), &has_nan);
  }
  if (has_nan) fail("image: contains NaN (not supported by find_peaks)");
  const int64_t n = static_cast<int64_t>(idx.size());
  py::array_t<int64_t> out({n, int64_t(3)});
  if (n > 0)
    kernels::peaks::indices_to_zyx(idx.data(), n, shape[1], shape[2], out.mutable_data());
  return out;
}

}  // namespace

void bind_peaks(py::module_& m) {
  m.def("find_peaks", &find_peaks, py::arg("image"), py::arg("min_distance"),
        py::arg("threshold"), py::arg("border"),
        "Local maxima with min_distance spacing (scikit-image peak_local_max "
        "semantics), int64 (N, 3) in raster order. threshold: already in the "
        "image dtype; border: exclusion widths (z, y, x).");
}

}  // namespace bind
}  // namespace ffn
