"""Build Tally: the Cython core and the embedded C API library.

The top-level folders are mapped into the ``tally`` namespace (``core`` ->
``tally.core`` and so on), so nothing called ``core`` or ``service`` lands in
site-packages.
"""
import glob
import os
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

TOP_LEVEL = {"tally": "tally", "tally.core": "core", "tally.service": "service",
             "tally.bench": "bench"}


def package_dirs():
    """Every package under the top-level folders, mapped into ``tally``."""
    dirs = {}
    for package, folder in TOP_LEVEL.items():
        for root, _, files in os.walk(folder):
            if "__init__.py" in files:
                dirs[package + root[len(folder):].replace(os.sep, ".")] = root
    return dirs


PACKAGE_DIRS = package_dirs()

# An editable install of folders mapped into a namespace goes through an import
# hook, and setuptools says so in a ten-line warning on every install. That is
# how Tally is installed for development: the warning tells nothing.
warnings.filterwarnings("ignore", "Editable installation")

# TALLY_DEBUG=1 builds with assertions and bounds checks, for chasing a bug.
DEBUG = os.environ.get("TALLY_DEBUG") == "1"
C_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]


# Folders whose .pyx files are compiled, and the package each lands in.
CYTHON_FOLDERS = {"core": "tally.core", "service/store": "tally.service.store"}


def cython_extensions():
    extensions = [
        Extension(
            package + "." + os.path.splitext(os.path.basename(path))[0],
            [path],
            include_dirs=[numpy.get_include(), "core/includes", "cext"],   # cext: tally.h
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=C_FLAGS,
        )
        for folder, package in CYTHON_FOLDERS.items()
        for path in sorted(glob.glob(f"{folder}/*.pyx"))
    ]
    return cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": DEBUG,
        },
    )


# --- libtally (cext/, the embedded C reader) ---------------------------------
# Built as an Extension only to reuse setuptools' compiler plumbing: the result,
# tally/_libtally.<abi tag>.so, is a plain C shared library with no PyInit, never
# imported; tally.service.store.embedded loads it with ctypes. cext/Makefile builds the
# same library (and the C tests) outside Python.
def libtally_extension():
    return Extension(
        "tally._libtally",
        ["cext/tally.c"],
        include_dirs=["cext"],
        libraries=["lmdb"],
        extra_compile_args=["-std=c99", "-D_POSIX_C_SOURCE=200809L",
                            "-fvisibility=hidden"] + C_FLAGS,
    )
# --- end libtally ------------------------------------------------------------


setup(
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"tally": ["*.pyi", "py.typed"], "tally.core": ["*.pyi", "*.pxi", "includes/*"],
                  "tally.service": ["examples/*.py", "examples/*.sql"],
                  "tally.service.ui": ["*.css", "*.svg"],
                  # the Flink peer's Maven project, which setup-peers builds
                  "tally.bench": ["peers/flink/pom.xml", "peers/flink/src/main/java/tally/peers/flink/*.java"]},
    ext_modules=cython_extensions() + [libtally_extension()],
)
