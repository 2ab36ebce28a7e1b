"""The installed pcace's version, read once from the package metadata (pyproject.toml).

Examples
--------
>>> from pcace.core.version import __version__
>>> __version__.count(".") >= 1
True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pcace")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
