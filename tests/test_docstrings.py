"""The examples in the library's docstrings run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import pcace

MODULES = sorted(m.name for m in pkgutil.walk_packages(pcace.__path__, "pcace."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "pcace.__main__":
        pytest.skip("runs the command line")
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # an optional dependency (Ray) is not installed
        pytest.skip(f"{name}: {err}")
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failed, _ = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert failed == 0, f"{failed} docstring example(s) of {name} fail (run pytest " \
        f"--doctest-modules src/{name.replace('.', '/')}.py to see them)"
