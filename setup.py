"""Builds the optional compiled relay (``zep._relay``).

Everything else is declared in pyproject.toml. If the extension cannot be
built (no C compiler, not Linux, no Cython) the package still installs and
runs on the pure-Python relay; ``ZEP_NO_EXTENSIONS=1`` skips the build.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("ZEP_NO_EXTENSIONS")) or not sys.platform.startswith("linux")


class BuildFailed(Exception):
    pass


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed build into a warning (the relay falls back)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils/setuptools raise several kinds
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        print(
            f"WARNING: the compiled relay could not be built ({exc}); "
            "zep will use the pure-Python relay.",
            file=sys.stderr,
        )


def extensions():
    if NO_EXTENSIONS:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: Cython is not available; zep will use the pure-Python relay.", file=sys.stderr)
        return []
    ext = Extension(
        "zep._relay",
        ["src/zep/_relay.pyx"],
    )
    return cythonize(
        [ext],
        include_path=["src"],
        language_level=3,
        compiler_directives={"embedsignature": True},
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
