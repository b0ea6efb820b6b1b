"""Build of the optional native extension; the metadata stays in pyproject.toml.

`optional=True`: without a compiler or OpenSSL's headers, setuptools warns and installs
pure-Python wgpy, which works the same, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wgpy._native",
            ["src/wgpy/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
            optional=True,
        ),
        Extension(  # the handshake intake (issue 18); -ffp-contract=off: the token buckets
            "wgpy._classify",  # must round as the Python ones do (no fused multiply-add)
            ["src/wgpy/_classify.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
