// SPDX-License-Identifier: Apache-2.0
//
// SYCL launcher: runs the kernel bodies of kernels/*.hpp in sycl::parallel_for
// on the default SYCL device (an Intel GPU through icpx, or any AdaptiveCpp
// target).  Outside the default build: compiled into floodfilling._kernels
// only on request, with -DFFN_SYCL=ON and a SYCL compiler (sycl/README.md,
// sycl/sycl.cmake); the module then exposes
//
//   sycl_device() -> str                      name of the device in use
//   sycl_gather_fovs(canvases, centers, fov_size, pad_value, out) -> out
//   sycl_update_fovs(canvases, logits, centers, move_threshold, deltas,
//                    disco_seed_threshold) -> (scores, offsets)
//   sycl_relabel(labels, keys, values)
//
// with the same arguments, checks and results as the CPU entry points.  The
// arrays live in host (NumPy) memory, so each call copies its inputs to USM
// device memory and the results back: this launcher demonstrates and tests the
// shared kernel bodies on a device; the inference engine keeps its GPU canvases
// as device tensors instead.
//
// Work decomposition (one work-item per ...):
//   gather_fovs: FOV row (k, z, y)  -> kernels::gather_fov on a 1 x 1 x fx box
//   update_fovs: FOV k              -> kernels::update_fov (whole FOV); when
//                two FOVs share a canvas, one single_task runs them in order
//   relabel:     voxel              -> kernels::reconcile::relabel_one
#include <sycl/sycl.hpp>

#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "csrc/bind_common.hpp"
#include "csrc/fov_args.hpp"
#include "kernels/fov_update.hpp"
#include "kernels/relabel.hpp"

namespace ffn {
namespace bind {

namespace {

using launch::FovTarget;

sycl::queue& device_queue() {
  static sycl::queue q{sycl::default_selector_v, sycl::property::queue::in_order{}};
  return q;
}

/// RAII USM device allocation of n elements of T.
template <class T>
class DeviceArray {
 public:
  DeviceArray(sycl::queue& q, size_t n) : q_(q), n_(n) {
    if (n_ > 0) {
      ptr_ = sycl::malloc_device<T>(n_, q_);
      if (!ptr_) throw std::runtime_error("SYCL: device allocation failed");
    }
  }
  ~DeviceArray() {
    if (ptr_) sycl::free(ptr_, q_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  void upload(const T* host) {
    if (n_) q_.memcpy(ptr_, host, n_ * sizeof(T));
  }
  void download(T* host) {
    if (n_) q_.memcpy(host, ptr_, n_ * sizeof(T));
  }

 private:
  sycl::queue& q_;
  size_t n_;
  T* ptr_ = nullptr;
};

/// The distinct canvases of `targets` on the device.  Targets that name the
/// same canvas share one device copy; partially overlapping canvases (views
/// into one another) are rejected.  Rewrites targets[i].canvas to device
/// pointers.
class DeviceCanvases {
 public:
  DeviceCanvases(sycl::queue& q, std::vector<FovTarget>& targets) {
    for (FovTarget& t : targets) {
      const size_t n = static_cast<size_t>(t.shape[0] * t.shape[1] * t.shape[2]);
      size_t slot = host_.size();
      for (size_t j = 0; j < host_.size(); ++j) {
        const bool same = host_[j] == t.canvas && sizes_[j] == n;
        const bool overlap = t.canvas < host_[j] + sizes_[j] && host_[j] < t.canvas + n;
        if (same) {
          slot = j;
          break;
        }
        if (overlap)
          fail("canvases: partially overlapping canvases are not supported by the SYCL "
               "launcher");
      }
      if (slot == host_.size()) {
        host_.push_back(t.canvas);
        sizes_.push_back(n);
        device_.push_back(std::make_unique<DeviceArray<float>>(q, n));
        device_.back()->upload(t.canvas);
      }
      t.canvas = device_[slot]->get();
    }
  }

  void download() {
    for (size_t j = 0; j < host_.size(); ++j) device_[j]->download(host_[j]);
  }

 private:
  std::vector<float*> host_;
  std::vector<size_t> sizes_;
  std::vector<std::unique_ptr<DeviceArray<float>>> device_;
};

std::string sycl_device() {
  return device_queue().get_device().get_info<sycl::info::device::name>();
}

py::array sycl_gather_fovs(py::handle canvases, py::handle centers,
                           std::array<int64_t, 3> fov, double pad_value, py::handle out_obj) {
  py::array out = require_array(out_obj, "out");
  if (!has_dtype<float>(out)) fail("out: expected dtype float32, got " + dtype_str(out));
  require_ndim(out, 4, "out");
  require_c_contiguous(out, "out");
  require_writeable(out, "out");
  const int64_t f0 = fov[0], f1 = fov[1], f2 = fov[2];
  const int64_t f[3] = {f0, f1, f2};
  check_fov_size(f, "fov_size");
  if (out.shape(1) != f0 || out.shape(2) != f1 || out.shape(3) != f2)
    fail("out: shape " + shape_str(out) + " does not match fov_size");
  const int64_t k = out.shape(0);
  std::vector<FovTarget> targets;
  resolve_canvases(canvases, k, false, targets);
  resolve_centers(centers, k, f, targets);
  if (k == 0) return out;
  sycl::queue& q = device_queue();
  {
    py::gil_scoped_release release;
    DeviceCanvases dev(q, targets);
    DeviceArray<FovTarget> dtargets(q, targets.size());
    dtargets.upload(targets.data());
    const size_t fsize = static_cast<size_t>(f0 * f1 * f2);
    DeviceArray<float> dout(q, static_cast<size_t>(k) * fsize);
    FovTarget* tp = dtargets.get();
    float* op = dout.get();
    const float pad = static_cast<float>(pad_value);
    q.parallel_for(sycl::range<3>(static_cast<size_t>(k), static_cast<size_t>(f0),
                                  static_cast<size_t>(f1)),
                   [=](sycl::id<3> id) {
                     const int64_t i = static_cast<int64_t>(id[0]);
                     const int64_t z = static_cast<int64_t>(id[1]);
                     const int64_t y = static_cast<int64_t>(id[2]);
                     const FovTarget& t = tp[i];
                     const int64_t fs[3] = {f0, f1, f2};
                     const int64_t sz = t.shape[1] * t.shape[2], sy = t.shape[2];
                     kernels::gather_fov(launch::box_origin(t, fs) + z * sz + y * sy, sz, sy,
                                         op + ((i * f0 + z) * f1 + y) * f2, 1, 1, f2, pad);
                   });
    dout.download(static_cast<float*>(out.mutable_data()));
    q.wait_and_throw();
  }
  return out;
}

py::tuple sycl_update_fovs(py::handle canvases, py::handle logits_obj, py::handle centers,
                           double move_threshold, std::array<int64_t, 3> deltas,
                           double disco_seed_threshold) {
  int64_t f[3];
  py::array logits = check_update_logits(logits_obj, deltas, f);
  const int64_t k = logits.shape(0);
  const int64_t f0 = f[0], f1 = f[1], f2 = f[2];
  std::vector<FovTarget> targets;
  const bool shared = resolve_canvases(canvases, k, true, targets);
  resolve_centers(centers, k, f, targets);
  py::array_t<float> scores({k, int64_t(6)});
  py::array_t<int64_t> offsets({k, int64_t(6), int64_t(3)});
  if (k == 0) return py::make_tuple(std::move(scores), std::move(offsets));
  float* host_logits = static_cast<float*>(logits.mutable_data());
  float* host_scores = scores.mutable_data();
  int64_t* host_offsets = offsets.mutable_data();
  sycl::queue& q = device_queue();
  {
    py::gil_scoped_release release;
    DeviceCanvases dev(q, targets);
    DeviceArray<FovTarget> dtargets(q, targets.size());
    dtargets.upload(targets.data());
    const size_t fsize = static_cast<size_t>(f0 * f1 * f2);
    DeviceArray<float> dlogits(q, static_cast<size_t>(k) * fsize);
    dlogits.upload(host_logits);
    DeviceArray<float> dscores(q, static_cast<size_t>(k) * 6);
    DeviceArray<int64_t> doffsets(q, static_cast<size_t>(k) * 18);
    FovTarget* tp = dtargets.get();
    float* lp = dlogits.get();
    float* sp = dscores.get();
    int64_t* op = doffsets.get();
    const float thr = static_cast<float>(move_threshold);
    const double disco = disco_seed_threshold;
    const int64_t d0 = deltas[0], d1 = deltas[1], d2 = deltas[2];
    auto one = [=](int64_t i) {
      const FovTarget& t = tp[i];
      const int64_t fs[3] = {f0, f1, f2};
      const int64_t ds[3] = {d0, d1, d2};
      kernels::update_fov(launch::box_origin(t, fs), t.shape[1] * t.shape[2], t.shape[2],
                          lp + i * f0 * f1 * f2, f0, f1, f2, thr, disco, ds, sp + 6 * i,
                          op + 18 * i);
    };
    if (shared) {  // FOVs sharing a canvas: in order, like the CPU launcher
      q.single_task([=]() {
        for (int64_t i = 0; i < k; ++i) one(i);
      });
    } else {
      q.parallel_for(sycl::range<1>(static_cast<size_t>(k)),
                     [=](sycl::id<1> id) { one(static_cast<int64_t>(id[0])); });
    }
    dev.download();
    dlogits.download(host_logits);
    dscores.download(host_scores);
    doffsets.download(host_offsets);
    q.wait_and_throw();
  }
  return py::make_tuple(std::move(scores), std::move(offsets));
}

template <class L>
void sycl_relabel_typed(L* host, size_t n, const uint64_t* keys, const uint64_t* values,
                        int64_t nk) {
  sycl::queue& q = device_queue();
  DeviceArray<L> dl(q, n);
  DeviceArray<uint64_t> dk(q, static_cast<size_t>(nk)), dv(q, static_cast<size_t>(nk));
  dl.upload(host);
  dk.upload(keys);
  dv.upload(values);
  L* lp = dl.get();
  const uint64_t* kp = dk.get();
  const uint64_t* vp = dv.get();
  q.parallel_for(sycl::range<1>(n), [=](sycl::id<1> i) {
    lp[i] = kernels::reconcile::relabel_one(lp[i], kp, vp, nk);
  });
  dl.download(host);
  q.wait_and_throw();
}

void sycl_relabel(py::handle labels_obj, py::handle keys_obj, py::handle values_obj) {
  RelabelArgs a = check_relabel_args(labels_obj, keys_obj, values_obj);
  const size_t n = static_cast<size_t>(a.labels.size());
  if (n == 0 || a.nk == 0) return;
  py::gil_scoped_release release;
  if (a.bits == 32)
    sycl_relabel_typed(static_cast<uint32_t*>(a.labels.mutable_data()), n, a.keys, a.values, a.nk);
  else
    sycl_relabel_typed(static_cast<uint64_t*>(a.labels.mutable_data()), n, a.keys, a.values, a.nk);
}

}  // namespace

void bind_sycl(py::module_& m) {
  m.def("sycl_device", &sycl_device, "Name of the SYCL device used by the sycl_* kernels.");
  m.def("sycl_gather_fovs", &sycl_gather_fovs, py::arg("canvases"), py::arg("centers"),
        py::arg("fov_size"), py::arg("pad_value"), py::arg("out"),
        "gather_fovs on the SYCL device (same semantics as gather_fovs).");
  m.def("sycl_update_fovs", &sycl_update_fovs, py::arg("canvases"), py::arg("logits"),
        py::arg("centers"), py::arg("move_threshold"), py::arg("deltas"),
        py::arg("disco_seed_threshold"),
        "update_fovs on the SYCL device (same semantics as update_fovs).");
  m.def("sycl_relabel", &sycl_relabel, py::arg("labels"), py::arg("keys"), py::arg("values"),
        "relabel on the SYCL device (same semantics as relabel).");
}

}  // namespace bind
}  // namespace ffn
