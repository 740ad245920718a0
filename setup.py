"""Build the compiled core, pymq._core.

PYMQ_DEBUG=1 turns bounds checks back on and adds line tracing and an
annotated HTML listing; PYMQ_SANITIZE=1 builds with AddressSanitizer and
UndefinedBehaviorSanitizer.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PYMQ_DEBUG") == "1"
SANITIZE = os.environ.get("PYMQ_SANITIZE") == "1"

compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-pthread"]
link_args = ["-pthread"]
macros = []
if DEBUG:
    compile_args = ["-O0", "-g", "-std=gnu11", "-pthread"]
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
if SANITIZE:
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    compile_args += flags
    link_args += flags

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "linetrace": DEBUG,
}

extensions = [
    Extension(
        "pymq._core",
        [
            "src/core/_core.pyx",
            "src/core/includes/crc32c.c",
            "src/core/includes/prefault.c",
        ],
        include_dirs=["src/core"],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["src/core"],
    ),
)
