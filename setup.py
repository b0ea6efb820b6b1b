"""Build of the optional native extension; the metadata stays in pyproject.toml.

`optional=True`: without a compiler or OpenSSL's headers, setuptools warns and installs
pure-Python wgpy, which works the same, only slower. No -Werror here: with optional=True a
new compiler's new warning would drop the module without a word. Warnings fail the tests
instead (tests/native/test_build.py, which also fails if the module did not build on a
machine that has gcc and libssl-dev).
"""

from glob import glob

from setuptools import Extension, setup

CLASSIFY = ["src/native/classify.c", "src/native/reader.c"]  # the intake, its reader thread
NATIVE = sorted(set(glob("src/native/*.c")) - set(CLASSIFY))  # a file per job

setup(
    ext_modules=[
        Extension(
            "wgpy._native",
            NATIVE,
            depends=["src/native/native.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
            optional=True,
        ),
        Extension(  # the handshake intake (issue 18); -ffp-contract=off: the token buckets
            "wgpy._classify",  # must round as the Python ones do (no fused multiply-add)
            CLASSIFY,
            depends=["src/native/classify.h"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
