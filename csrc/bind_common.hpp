// SPDX-License-Identifier: Apache-2.0
//
// Shared argument checking for the pybind11 bindings.  Every failure throws
// std::invalid_argument (-> Python ValueError) whose message starts with the
// name of the offending argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace ffn {
namespace bind {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()); }

inline std::string type_name(py::handle h) {
  return py::str(py::type::handle_of(h).attr("__name__"));
}

/// The object as a numpy array (no conversion), or ValueError naming `name`.
inline py::array require_array(py::handle h, const std::string& name) {
  if (!py::isinstance<py::array>(h))
    fail(name + ": expected a numpy.ndarray, got " + type_name(h));
  return py::reinterpret_borrow<py::array>(h);
}

template <class T>
inline bool has_dtype(const py::array& a) {
  return a.dtype().equal(py::dtype::of<T>());
}

inline void require_ndim(const py::array& a, py::ssize_t ndim, const std::string& name) {
  if (a.ndim() != ndim)
    fail(name + ": expected a " + std::to_string(ndim) + "-D array, got shape " +
         shape_str(a));
}

inline void require_c_contiguous(const py::array& a, const std::string& name) {
  if (!(a.flags() & py::array::c_style))
    fail(name + ": must be C-contiguous (it is modified in place or read as a flat "
                "buffer); use numpy.ascontiguousarray");
}

inline void require_writeable(const py::array& a, const std::string& name) {
  if (!a.writeable()) fail(name + ": must be writeable (it is modified in place)");
}

/// Bits of an unsigned label dtype (32 or 64), or ValueError naming `name`.
inline int label_bits(const py::array& a, const std::string& name) {
  if (has_dtype<uint32_t>(a)) return 32;
  if (has_dtype<uint64_t>(a)) return 64;
  fail(name + ": expected dtype uint32 or uint64, got " + dtype_str(a));
}

/// Whether the array's dtype is a (native) integer type.
inline bool is_integer(const py::array& a) {
  const char k = a.dtype().kind();
  return (k == 'i' || k == 'u') && a.dtype().attr("isnative").cast<bool>();
}

/// Checked arguments of relabel (every launcher): labels uint32/uint64,
/// C-contiguous, writeable; keys and values uint64 1-D C-contiguous of one
/// length, keys strictly increasing, each value fitting the labels' dtype where
/// its key can occur.
struct RelabelArgs {
  py::array labels;
  int bits;
  const uint64_t* keys;
  const uint64_t* values;
  int64_t nk;
};

inline RelabelArgs check_relabel_args(py::handle labels_obj, py::handle keys_obj,
                                      py::handle values_obj) {
  py::array labels = require_array(labels_obj, "labels");
  const int bits = label_bits(labels, "labels");
  require_c_contiguous(labels, "labels");
  require_writeable(labels, "labels");
  py::array keys = require_array(keys_obj, "keys");
  py::array values = require_array(values_obj, "values");
  if (!has_dtype<uint64_t>(keys)) fail("keys: expected dtype uint64, got " + dtype_str(keys));
  if (!has_dtype<uint64_t>(values))
    fail("values: expected dtype uint64, got " + dtype_str(values));
  require_ndim(keys, 1, "keys");
  require_ndim(values, 1, "values");
  require_c_contiguous(keys, "keys");
  require_c_contiguous(values, "values");
  const int64_t nk = keys.shape(0);
  if (values.shape(0) != nk)
    fail("values: length " + std::to_string(values.shape(0)) + " does not match keys' " +
         std::to_string(nk));
  const uint64_t* kp = static_cast<const uint64_t*>(keys.data());
  const uint64_t* vp = static_cast<const uint64_t*>(values.data());
  for (int64_t i = 1; i < nk; ++i)
    if (!(kp[i - 1] < kp[i]))
      fail("keys: must be sorted in strictly increasing order (keys[" + std::to_string(i - 1) +
           "] >= keys[" + std::to_string(i) + "])");
  if (bits == 32) {
    const uint64_t lim = std::numeric_limits<uint32_t>::max();
    for (int64_t i = 0; i < nk && kp[i] <= lim; ++i)
      if (vp[i] > lim)
        fail("values: values[" + std::to_string(i) + "] = " + std::to_string(vp[i]) +
             " does not fit in the uint32 labels");
  }
  return {labels, bits, kp, vp, nk};
}

}  // namespace bind
}  // namespace ffn
