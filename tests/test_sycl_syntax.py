"""The SYCL sources (sycl/host.cpp, sycl/kernels.cpp) parse and type-check, against the REAL
SYCL headers of the intel-sycl-rt wheel (``pip install "floodfilling[sycl]"``), with the host
C++ compiler: host.cpp as the backend builds it, kernels.cpp (device code, run-time compiled by
the SYCL runtime) as host code with the kernels/*.hpp it includes. A fast check that runs
without a device; tests/test_sycl_kernels.py runs them.

Without the runtime these are skipped, except under ``CI`` (set to anything), where a missing
runtime fails them: CI installs the extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sycl_include():
    cxx = shutil.which(os.environ.get("FFN_SYCL_CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    from floodfilling import sycl_backend as sb

    try:
        prefix = sb._find_runtime()
    except sb.SyclError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and the SYCL runtime is missing: {exc}")
        pytest.skip(str(exc))
    return cxx, prefix / "include"


def test_sycl_sources_parse_against_the_real_headers(sycl_include):
    cxx, include = sycl_include
    procs = {}
    for source in ("host.cpp", "kernels.cpp"):  # both at once: each parses all of sycl.hpp
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
               "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING", f"-isystem{include}", f"-I{ROOT}",
               str(ROOT / "sycl" / source)]
        procs[source] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    for source, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"sycl/{source}:\n{err[-4000:]}"
