"""rank()'s keyword arguments and the declared options (run.config.RankOptions) agree."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import pcace
from pcace.run.config import RankOptions


def test_signature_equals_the_declarations():
    params = inspect.signature(pcace.rank).parameters
    declared = {f.name: f.default for f in dataclasses.fields(RankOptions)}
    given = {n: p.default for n, p in params.items() if n not in ("model", "images")}
    assert given == declared


def test_docstring_documents_every_option():
    doc = pcace.rank.__doc__
    for f in dataclasses.fields(RankOptions):
        assert f"\n    {f.name} : {f.metadata['kind']}" in doc, f.name


@pytest.mark.parametrize("bad, match", [
    ({"permutations": -1}, "permutations"),
    ({"level": 1.5}, "level"),
    ({"pca_dtype": "float16"}, "pca_dtype"),
    ({"engine": "spark"}, "engine must be one of"),
    ({"ace_options": [1]}, "ace_options"),
    ({"per_label": True, "label": 3}, "do not also give"),
    ({"resume": True}, "checkpoint_dir"),
])
def test_bad_options_are_refused_before_any_work(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RankOptions(**bad)
