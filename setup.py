"""Build of aiotransfer's Cython/C core against the system libfabric.

libfabric is found through AIOTRANSFER_LIBFABRIC_PREFIX (a prefix with
include/ and lib/), else pkg-config.  A missing library stops the build with
the name of the package to install.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

HELP = (
    "aiotransfer needs libfabric's headers and library.\n"
    "  Debian/Ubuntu: apt-get install libfabric-dev libfabric-bin pkg-config\n"
    "  Fedora/RHEL:   dnf install libfabric-devel\n"
    "or set AIOTRANSFER_LIBFABRIC_PREFIX to a prefix holding include/rdma/fabric.h "
    "and lib/libfabric.so."
)


def libfabric_flags():
    prefix = os.environ.get("AIOTRANSFER_LIBFABRIC_PREFIX")
    if prefix:
        inc = os.path.join(prefix, "include")
        if not os.path.exists(os.path.join(inc, "rdma", "fabric.h")):
            sys.exit(f"AIOTRANSFER_LIBFABRIC_PREFIX={prefix}: no include/rdma/fabric.h\n{HELP}")
        libdirs = [d for d in (os.path.join(prefix, "lib"), os.path.join(prefix, "lib64"))
                   if os.path.isdir(d)]
        return {"include_dirs": [inc], "library_dirs": libdirs,
                "runtime_library_dirs": libdirs, "libraries": ["fabric"]}
    if shutil.which("pkg-config") is None:
        sys.exit(f"pkg-config not found.\n{HELP}")
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", "libfabric"], text=True,
                                         stderr=subprocess.PIPE).split()
        libs = subprocess.check_output(["pkg-config", "--libs", "libfabric"], text=True,
                                       stderr=subprocess.PIPE).split()
    except subprocess.CalledProcessError:
        sys.exit(f"pkg-config does not know libfabric.\n{HELP}")
    return {
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "libraries": [f[2:] for f in libs if f.startswith("-l")],
    }


def extensions():
    from Cython.Build import cythonize

    fab = libfabric_flags()
    debug = os.environ.get("AIOTRANSFER_DEBUG") == "1"
    ext = Extension(
        "aiotransfer._core",
        sources=["aiotransfer/_core.pyx", "csrc/atx.c", "csrc/shm_unstick.c", "csrc/shm_keys.c"],
        include_dirs=["csrc"] + fab["include_dirs"],
        library_dirs=fab["library_dirs"],
        runtime_library_dirs=fab.get("runtime_library_dirs", []),
        libraries=fab["libraries"] + ["pthread"],
        extra_compile_args=["-O0" if debug else "-O2", "-g", "-Wall",
                            "-Wno-unused-function"],
    )
    return cythonize([ext], language_level=3,
                     compiler_directives={"embedsignature": True})


setup(ext_modules=extensions())
