# SPDX-License-Identifier: Apache-2.0
#
# -DFFN_SYCL=ON: compile the SYCL sources ahead of time with a SYCL compiler
# (icpx -fsycl), as a build check that they stay valid SYCL for it: the device
# kernels of sycl/kernels.cpp (free-function kernels, device code generated
# now) and the host glue sycl/host.cpp.  The package does not use these
# objects: at run time, floodfilling.sycl_backend compiles host.cpp with g++
# and the kernels with the SYCL runtime's kernel compiler (sycl/README.md).
# Never run on the machines this package was developed on (no icpx there).
include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "-fsycl")
set(CMAKE_REQUIRED_LINK_OPTIONS "-fsycl")
set(CMAKE_REQUIRED_QUIET ON)
check_cxx_source_compiles("#include <sycl/sycl.hpp>\nint main() { sycl::queue q; return 0; }"
                          FFN_CXX_ACCEPTS_FSYCL)
unset(CMAKE_REQUIRED_FLAGS)
unset(CMAKE_REQUIRED_LINK_OPTIONS)
unset(CMAKE_REQUIRED_QUIET)
if(NOT FFN_CXX_ACCEPTS_FSYCL)
  message(FATAL_ERROR "floodfilling: FFN_SYCL=ON but the C++ compiler (${CMAKE_CXX_COMPILER_ID} "
                      "${CMAKE_CXX_COMPILER_VERSION}) does not accept -fsycl (use icpx); "
                      "see sycl/README.md")
endif()
add_library(ffn_sycl_aot OBJECT
  "${CMAKE_CURRENT_LIST_DIR}/kernels.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/host.cpp")
target_include_directories(ffn_sycl_aot PRIVATE "${PROJECT_SOURCE_DIR}")
# the kernels rely on IEEE NaN comparisons and bitwise-exact results (no FMA
# contraction), as the run-time build's -ffp-contract=off
target_compile_options(ffn_sycl_aot PRIVATE -fsycl -fp-model=precise -ffp-contract=off)
message(STATUS "floodfilling: SYCL sources compiled ahead of time (build check): sycl/kernels.cpp, sycl/host.cpp")
