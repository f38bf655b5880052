// Syntax-check stub of the SYCL names sycl/sycl_launch.cpp uses, for tests/test_sycl_syntax.py.
// NOT a SYCL implementation: kernels are never run; it only lets a host C++ compiler
// parse and type-check the launcher where no SYCL compiler exists.
#pragma once
#include <cstddef>
#include <string>
namespace sycl {
template <int N> struct id { size_t v[N]; size_t operator[](int i) const { return v[i]; } operator size_t() const { return v[0]; } };
template <int N> struct range { template <class... T> range(T...) {} };
struct default_selector_t {};
inline constexpr default_selector_t default_selector_v{};
namespace property { namespace queue { struct in_order {}; } }
namespace info { namespace device { struct name { using return_type = std::string; }; } }
struct device { template <class P> typename P::return_type get_info() const { return {}; } };
struct event { void wait() {} };
struct queue {
  template <class S, class P> queue(S, P) {}
  template <int N, class F> event parallel_for(range<N>, F) { return {}; }
  template <class F> event single_task(F) { return {}; }
  event memcpy(void*, const void*, size_t) { return {}; }
  void wait() {}
  void wait_and_throw() {}
  device get_device() const { return {}; }
};
template <class T> T* malloc_device(size_t, queue&) { return nullptr; }
inline void free(void*, queue&) {}
}  // namespace sycl
