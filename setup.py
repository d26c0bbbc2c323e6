# setup.py only declares the compiled extension engine._core; all metadata is in pyproject.toml.
# COWCHAIN_DEBUG=1 builds a debug variant: annotated HTML, line tracing, ENGINE_DEBUG checks.
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("COWCHAIN_DEBUG") == "1"
macros = [("_GNU_SOURCE", None), ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if debug:
    macros += [("ENGINE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")]

ext = Extension(
    "engine._core",
    ["engine/_core.pyx"],
    include_dirs=[numpy.get_include()],
    define_macros=macros,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
    + (["-O0", "-g"] if debug else []),
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives={
            "language_level": 3,
            "binding": True,
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": debug,
        },
        annotate=debug,
    )
)
