// SPDX-License-Identifier: Apache-2.0
//
// SYCL host glue: a small C ABI over the SYCL runtime (queue, device info,
// kernel bundles built from source, launches of named kernels, USM memory),
// loaded with ctypes by python/floodfilling/sycl_backend.py.  No algorithm
// here: only argument checks and SYCL calls.
//
// Built on first use by sycl_backend.py with the host's g++ against the SYCL
// headers and libsycl.so of the intel-sycl-rt wheel (no SYCL compiler needed:
// this file has no device code; the kernels, sycl/kernels.cpp, are compiled
// at run time by the runtime's kernel compiler).  Any SYCL 2020 compiler with
// the oneAPI kernel_compiler extension (icpx) builds it too.
//
// Conventions: every function returning int returns 0 on success and -1 on
// failure, the error text (one message, never an exception across the ABI)
// then being available from ffn_sycl_last_error() on the same thread.
// Handles are opaque pointers owned by the caller, released with the
// matching ffn_sycl_release_* function (bundles and kernels must be released
// before the process exits: an executable bundle destroyed during static
// destruction aborts the process).
#include <sycl/sycl.hpp>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace syclex = sycl::ext::oneapi::experimental;

namespace {

thread_local std::string g_error;
thread_local std::string g_text;  // returned strings (valid until the next call)

struct Queue {
  sycl::queue q;
};

struct Bundle {
  sycl::kernel_bundle<sycl::bundle_state::executable> exe;
};

struct Kernel {
  sycl::kernel k;
};

int fail(const std::string& msg) {
  g_error = msg;
  return -1;
}

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const sycl::exception& e) {
    return fail(std::string("SYCL error: ") + e.what());
  } catch (const std::exception& e) {
    return fail(e.what());
  } catch (...) {
    return fail("unknown C++ exception");
  }
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string backend_name(sycl::backend b) {
  switch (b) {
    case sycl::backend::opencl: return "opencl";
    case sycl::backend::ext_oneapi_level_zero: return "level_zero";
    case sycl::backend::ext_oneapi_cuda: return "cuda";
    case sycl::backend::ext_oneapi_hip: return "hip";
    default: return "other";
  }
}

std::string type_name(sycl::info::device_type t) {
  switch (t) {
    case sycl::info::device_type::cpu: return "cpu";
    case sycl::info::device_type::gpu: return "gpu";
    case sycl::info::device_type::accelerator: return "accelerator";
    default: return "other";
  }
}

std::string device_json(sycl::device d) {  // by value: ext_oneapi_can_compile is not const
  std::ostringstream o;
  o << "{\"name\": \"" << json_escape(d.get_info<sycl::info::device::name>()) << "\", "
    << "\"vendor\": \"" << json_escape(d.get_info<sycl::info::device::vendor>()) << "\", "
    << "\"driver\": \"" << json_escape(d.get_info<sycl::info::device::driver_version>())
    << "\", "
    << "\"version\": \"" << json_escape(d.get_info<sycl::info::device::version>()) << "\", "
    << "\"backend\": \"" << backend_name(d.get_backend()) << "\", "
    << "\"type\": \"" << type_name(d.get_info<sycl::info::device::device_type>()) << "\", "
    << "\"fp64\": " << (d.has(sycl::aspect::fp64) ? "true" : "false") << ", "
    << "\"atomic64\": " << (d.has(sycl::aspect::atomic64) ? "true" : "false") << ", "
    << "\"usm_shared\": " << (d.has(sycl::aspect::usm_shared_allocations) ? "true" : "false")
    << ", "
    << "\"compute_units\": " << d.get_info<sycl::info::device::max_compute_units>() << ", "
    << "\"max_work_group_size\": " << d.get_info<sycl::info::device::max_work_group_size>()
    << ", "
    << "\"can_compile_sycl\": "
    << (d.ext_oneapi_can_compile(syclex::source_language::sycl) ? "true" : "false") << "}";
  return o.str();
}

/// Devices matching a selector "[backend:]type[:index]": backend opencl,
/// level_zero, cuda, hip or *; type cpu, gpu, accelerator or *; "" or
/// "default" is SYCL's default selector.
std::vector<sycl::device> match(const std::string& sel, std::string* why) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : sel) {
    if (c == ':') {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  std::string backend = "*", type = "*";
  long index = -1;
  auto is_type = [](const std::string& s) {
    return s == "cpu" || s == "gpu" || s == "accelerator" || s == "*";
  };
  auto is_index = [](const std::string& s) {
    return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
  };
  if (parts.size() == 1 && is_type(parts[0])) {
    type = parts[0];
  } else if (parts.size() == 2 && is_type(parts[1])) {
    backend = parts[0];
    type = parts[1];
  } else if (parts.size() == 2 && is_type(parts[0]) && is_index(parts[1])) {
    type = parts[0];
    index = std::stol(parts[1]);
  } else if (parts.size() == 3 && is_type(parts[1]) && is_index(parts[2])) {
    backend = parts[0];
    type = parts[1];
    index = std::stol(parts[2]);
  } else {
    *why = "selector '" + sel +
           "': expected [backend:]type[:index] (backend opencl, level_zero, cuda, hip or *; "
           "type cpu, gpu, accelerator or *), or 'default'";
    return {};
  }
  std::vector<sycl::device> out;
  for (const sycl::device& d : sycl::device::get_devices()) {
    if (backend != "*" && backend_name(d.get_backend()) != backend) continue;
    if (type != "*" && type_name(d.get_info<sycl::info::device::device_type>()) != type)
      continue;
    out.push_back(d);
  }
  if (index >= 0) {
    if (index >= static_cast<long>(out.size())) return {};
    return {out[static_cast<size_t>(index)]};
  }
  return out;
}

}  // namespace

extern "C" {

/// Version of this ABI (the Python side checks it).
int ffn_sycl_abi_version() { return 2; }

const char* ffn_sycl_last_error() { return g_error.c_str(); }

/// Every device the runtime sees, as a JSON list (the string lives until the
/// next call on this thread); NULL on failure.
const char* ffn_sycl_devices_json() {
  const int rc = guarded([] {
    std::string s = "[";
    bool first = true;
    for (const sycl::device& d : sycl::device::get_devices()) {
      if (!first) s += ", ";
      first = false;
      s += device_json(d);
    }
    g_text = s + "]";
  });
  return rc == 0 ? g_text.c_str() : nullptr;
}

/// An in-order queue on the first device matching `selector`.
int ffn_sycl_open(const char* selector, void** out) {
  if (!selector || !out) return fail("ffn_sycl_open: null argument");
  *out = nullptr;
  return guarded([&] {
    const std::string sel(selector);
    sycl::device dev;
    if (sel.empty() || sel == "default") {
      dev = sycl::device{sycl::default_selector_v};
    } else {
      std::string why;
      std::vector<sycl::device> found = match(sel, &why);
      if (!why.empty()) throw std::invalid_argument(why);
      if (found.empty())
        throw std::runtime_error("no SYCL device matches '" + sel + "'");
      dev = found[0];
    }
    auto h = std::make_unique<Queue>(
        Queue{sycl::queue{dev, sycl::property_list{sycl::property::queue::in_order{}}}});
    *out = h.release();
  });
}

/// Adopt a queue somebody else made (a `sycl::queue*`, e.g. torch's current
/// xpu stream's `sycl_queue`): kernels launched on it are ordered with that
/// owner's work when it is an in-order queue.  The copy shares the queue; the
/// owner's object must outlive nothing of ours.
int ffn_sycl_adopt(void* sycl_queue, void** out) {
  if (!sycl_queue || !out) return fail("ffn_sycl_adopt: null argument");
  *out = nullptr;
  return guarded([&] {
    auto h = std::make_unique<Queue>(Queue{*static_cast<sycl::queue*>(sycl_queue)});
    *out = h.release();
  });
}

/// The queue's device as a JSON object (string valid until the next call).
const char* ffn_sycl_device_json(void* queue) {
  if (!queue) {
    fail("ffn_sycl_device_json: null queue");
    return nullptr;
  }
  const int rc = guarded([&] { g_text = device_json(static_cast<Queue*>(queue)->q.get_device()); });
  return rc == 0 ? g_text.c_str() : nullptr;
}

void ffn_sycl_release_queue(void* queue) {
  if (!queue) return;
  try {
    static_cast<Queue*>(queue)->q.wait();
  } catch (...) {
  }
  delete static_cast<Queue*>(queue);
}

/// Build SYCL source (with `n_includes` virtual include files, names[i] ->
/// texts[i]) for the queue's device into an executable bundle.  `options`:
/// n_options compiler options (e.g. -ffp-contract=off).  On failure the
/// error text holds the compiler log.
int ffn_sycl_build(void* queue, const char* source, int n_includes, const char* const* names,
                   const char* const* texts, int n_options, const char* const* options,
                   void** out) {
  if (!queue || !source || !out || n_includes < 0 || n_options < 0)
    return fail("ffn_sycl_build: bad argument");
  *out = nullptr;
  std::string log;
  const int rc = guarded([&] {
    sycl::queue& q = static_cast<Queue*>(queue)->q;
    sycl::device dev = q.get_device();
    if (!dev.ext_oneapi_can_compile(syclex::source_language::sycl))
      throw std::runtime_error("the device cannot compile SYCL source at run time "
                               "(sycl_ext_oneapi_kernel_compiler)");
    syclex::include_files incs;
    for (int i = 0; i < n_includes; ++i) incs.add(names[i], texts[i]);
    std::vector<std::string> opts;
    for (int i = 0; i < n_options; ++i) opts.emplace_back(options[i]);
    auto src = syclex::create_kernel_bundle_from_source(
        q.get_context(), syclex::source_language::sycl, std::string(source),
        syclex::properties{incs});
    auto exe = syclex::build(src, std::vector<sycl::device>{q.get_device()},
                             syclex::properties{syclex::build_options{opts},
                                                syclex::save_log{&log}});
    *out = new Bundle{std::move(exe)};
  });
  if (rc != 0 && !log.empty() && g_error.find(log) == std::string::npos)
    g_error += "\n" + log;
  return rc;
}

void ffn_sycl_release_bundle(void* bundle) { delete static_cast<Bundle*>(bundle); }

/// The kernel named `name` (its extern "C" symbol) of a built bundle.
int ffn_sycl_kernel(void* bundle, const char* name, void** out) {
  if (!bundle || !name || !out) return fail("ffn_sycl_kernel: null argument");
  *out = nullptr;
  return guarded([&] {
    Bundle* b = static_cast<Bundle*>(bundle);
    if (!b->exe.ext_oneapi_has_kernel(name))
      throw std::invalid_argument(std::string("no kernel named '") + name + "' in the bundle");
    *out = new Kernel{b->exe.ext_oneapi_get_kernel(name)};
  });
}

void ffn_sycl_release_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

/// Argument kinds of ffn_sycl_launch; bits[i] holds the value's bytes
/// (pointers and integers as themselves, float/double by their bit pattern).
enum ArgKind { kPointer = 0, kInt64 = 1, kUInt64 = 2, kDouble = 3, kFloat = 4, kInt32 = 5,
               kUInt32 = 6 };

/// Launch `kernel` over nd_range<1>(global, local) (global a multiple of
/// local) with n_args typed arguments; waits for it when `wait` is non-zero.
int ffn_sycl_launch(void* queue, void* kernel, uint64_t global, uint64_t local, int n_args,
                    const int* kinds, const uint64_t* bits, int wait) {
  if (!queue || !kernel || n_args < 0 || (n_args && (!kinds || !bits)))
    return fail("ffn_sycl_launch: bad argument");
  if (local == 0 || global % local != 0)
    return fail("ffn_sycl_launch: global size must be a positive multiple of the local size");
  for (int i = 0; i < n_args; ++i)
    if (kinds[i] < kPointer || kinds[i] > kUInt32)
      return fail("ffn_sycl_launch: unknown argument kind " + std::to_string(kinds[i]));
  return guarded([&] {
    sycl::queue& q = static_cast<Queue*>(queue)->q;
    const sycl::kernel& k = static_cast<Kernel*>(kernel)->k;
    sycl::event e = q.submit([&](sycl::handler& h) {
      for (int i = 0; i < n_args; ++i) {
        const uint64_t v = bits[i];
        switch (kinds[i]) {
          case kPointer: h.set_arg(i, reinterpret_cast<void*>(static_cast<uintptr_t>(v))); break;
          case kInt64: h.set_arg(i, static_cast<int64_t>(v)); break;
          case kUInt64: h.set_arg(i, v); break;
          case kDouble: {
            double d;
            std::memcpy(&d, &v, sizeof d);
            h.set_arg(i, d);
            break;
          }
          case kFloat: {
            const uint32_t w = static_cast<uint32_t>(v);
            float f;
            std::memcpy(&f, &w, sizeof f);
            h.set_arg(i, f);
            break;
          }
          case kInt32: h.set_arg(i, static_cast<int32_t>(static_cast<uint32_t>(v))); break;
          case kUInt32: h.set_arg(i, static_cast<uint32_t>(v)); break;
        }
      }
      h.parallel_for(sycl::nd_range<1>{sycl::range<1>(global), sycl::range<1>(local)}, k);
    });
    if (wait) e.wait_and_throw();
  });
}

/// Wait for everything submitted to the queue (errors of asynchronous work
/// are reported here).
int ffn_sycl_wait(void* queue) {
  if (!queue) return fail("ffn_sycl_wait: null queue");
  return guarded([&] { static_cast<Queue*>(queue)->q.wait_and_throw(); });
}

/// USM allocation of `bytes` (kind 0 shared, 1 device, 2 host); NULL on failure.
void* ffn_sycl_malloc(void* queue, uint64_t bytes, int kind) {
  if (!queue || kind < 0 || kind > 2) {
    fail("ffn_sycl_malloc: bad argument");
    return nullptr;
  }
  void* p = nullptr;
  const int rc = guarded([&] {
    sycl::queue& q = static_cast<Queue*>(queue)->q;
    const size_t n = bytes ? static_cast<size_t>(bytes) : 1;
    if (kind == 0)
      p = sycl::malloc_shared(n, q);
    else if (kind == 1)
      p = sycl::malloc_device(n, q);
    else
      p = sycl::malloc_host(n, q);
    if (!p) throw std::runtime_error("USM allocation of " + std::to_string(bytes) +
                                     " bytes failed");
  });
  return rc == 0 ? p : nullptr;
}

int ffn_sycl_free(void* queue, void* ptr) {
  if (!queue) return fail("ffn_sycl_free: null queue");
  if (!ptr) return 0;
  return guarded([&] { sycl::free(ptr, static_cast<Queue*>(queue)->q); });
}

/// Copy `bytes` (host or USM on either side); waits for the copy.
int ffn_sycl_memcpy(void* queue, void* dst, const void* src, uint64_t bytes) {
  if (!queue || (bytes && (!dst || !src))) return fail("ffn_sycl_memcpy: bad argument");
  if (!bytes) return 0;
  return guarded([&] {
    static_cast<Queue*>(queue)->q.memcpy(dst, src, static_cast<size_t>(bytes)).wait_and_throw();
  });
}

/// USM kind of a pointer in the queue's context: 0 not USM, 1 host, 2 device,
/// 3 shared; -1 on failure.
int ffn_sycl_pointer_kind(void* queue, const void* ptr) {
  if (!queue) return fail("ffn_sycl_pointer_kind: null queue");
  int kind = 0;
  const int rc = guarded([&] {
    switch (sycl::get_pointer_type(ptr, static_cast<Queue*>(queue)->q.get_context())) {
      case sycl::usm::alloc::host: kind = 1; break;
      case sycl::usm::alloc::device: kind = 2; break;
      case sycl::usm::alloc::shared: kind = 3; break;
      default: kind = 0;
    }
  });
  return rc == 0 ? kind : -1;
}

}  // extern "C"
