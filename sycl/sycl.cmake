# SPDX-License-Identifier: Apache-2.0
#
# Opt-in SYCL launcher (see sycl/README.md).  Included by the top-level
# CMakeLists.txt only when FFN_SYCL=ON: it adds sycl/sycl_launch.cpp to the
# _kernels target, which then also exposes sycl_device, sycl_gather_fovs,
# sycl_update_fovs and sycl_relabel (and build_info()['sycl'] is True).
#
# The SYCL compiler is found as IntelSYCL (icpx), then AdaptiveCpp, then any
# C++ compiler accepting -fsycl; with none of them the configure fails.
set(_ffn_sycl_source "${CMAKE_CURRENT_LIST_DIR}/sycl_launch.cpp")
set(_ffn_sycl_kind "")
find_package(IntelSYCL QUIET)
if(IntelSYCL_FOUND)
  set(_ffn_sycl_kind "IntelSYCL")
else()
  find_package(AdaptiveCpp QUIET)
  if(AdaptiveCpp_FOUND)
    set(_ffn_sycl_kind "AdaptiveCpp")
  else()
    include(CheckCXXSourceCompiles)
    set(CMAKE_REQUIRED_FLAGS "-fsycl")
    set(CMAKE_REQUIRED_LINK_OPTIONS "-fsycl")
    set(CMAKE_REQUIRED_QUIET ON)
    check_cxx_source_compiles(
      "#include <sycl/sycl.hpp>\nint main() { sycl::queue q; return 0; }"
      FFN_CXX_ACCEPTS_FSYCL)
    unset(CMAKE_REQUIRED_FLAGS)
    unset(CMAKE_REQUIRED_LINK_OPTIONS)
    unset(CMAKE_REQUIRED_QUIET)
    if(FFN_CXX_ACCEPTS_FSYCL)
      set(_ffn_sycl_kind "fsycl")
    endif()
  endif()
endif()

if(NOT _ffn_sycl_kind)
  message(FATAL_ERROR "floodfilling: FFN_SYCL=ON but no SYCL compiler was found (compiler "
                      "${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}); "
                      "see sycl/README.md")
endif()

target_sources(_kernels PRIVATE "${_ffn_sycl_source}")
target_compile_definitions(_kernels PRIVATE FFN_HAVE_SYCL=1)
if(_ffn_sycl_kind STREQUAL "fsycl")
  set_source_files_properties("${_ffn_sycl_source}" PROPERTIES COMPILE_OPTIONS "-fsycl")
  target_link_options(_kernels PRIVATE -fsycl)
else()
  add_sycl_to_target(TARGET _kernels SOURCES "${_ffn_sycl_source}")
endif()
message(STATUS "floodfilling: SYCL launcher enabled (${_ffn_sycl_kind}): ${_ffn_sycl_source}")
