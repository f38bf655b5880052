// Shared by every kernel header: plain C++17, no Python, no I/O.
#pragma once

// FFN_KERNEL_INLINE: the bodies are always inlined into their launchers, so
// that the CPU launcher's AVX2 / AVX-512 clones (function multiversioning in
// csrc/launch_omp.cpp) compile them with the wider vectors.
#ifndef FFN_KERNEL_INLINE
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__SYCL_DEVICE_ONLY__)
#define FFN_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define FFN_KERNEL_INLINE inline
#endif
#endif
