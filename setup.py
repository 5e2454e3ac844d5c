"""Only the optional C accelerator lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler (or Python headers) the build goes on and amid uses
its pure-Python path, which gives the same output, only slower (``amid --version`` says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("amid.ami._speedups", ["amid/ami/_speedups.c"], optional=True,
                             extra_compile_args=["-O2"])])
