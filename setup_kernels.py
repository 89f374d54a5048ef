"""``python setup_kernels.py build_ext --inplace``: the setuptools spelling of the kernel build.

YAIE's kernels are numba.cuda, compiled by NVVM at run time, so there is no C extension to build;
``build_ext`` here compiles every kernel specialisation for the local GPU into numba's on-disk
cache, exactly as ``python -m yaie.kernels.build`` does (see kernels/build.py).
"""

from __future__ import annotations

import sys
from typing import ClassVar

from setuptools import Command
from setuptools.dist import Distribution


class BuildKernels(Command):
    """Ahead-of-time compilation of the numba kernels (``--inplace`` is accepted and implied)."""

    description = "compile YAIE's numba kernels into numba's on-disk cache"
    user_options: ClassVar = [("inplace", "i", "accepted; the cache is always in place")]
    boolean_options: ClassVar = ["inplace"]

    def initialize_options(self) -> None:
        self.inplace = False

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        from yaie.kernels.build import main

        if main([]) != 0:
            raise SystemExit(1)


if __name__ == "__main__":
    # A bare Distribution with no packages: setuptools.setup() would read pyproject.toml and
    # discover packages, none of which this command builds.
    dist = Distribution(
        {
            "script_name": "setup_kernels.py",
            "script_args": sys.argv[1:],
            "packages": [],
            "py_modules": [],
        }
    )
    dist.cmdclass["build_ext"] = BuildKernels
    dist.parse_command_line()
    dist.run_commands()
