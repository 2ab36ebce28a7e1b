"""Tests of pcace.inputs.targets."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from pcace.inputs.categories import (
    Categories,
    choose_categories,
    describe_resolved,
    resolve_target_for_model,
)
from pcace.inputs.targets import (
    ClassLogit,
    ClassProbability,
    CustomTarget,
    RegressionOutput,
    Target,
    resolve_target,
    target_from_dict,
)

CATS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUT = torch.arange(20.0).reshape(2, 10)


def test_class_logit():
    t = ClassLogit(3, "cat")
    assert torch.equal(t(OUT), torch.tensor([3.0, 13.0]))
    assert t.describe() == "logit of class 3 (cat)"
    assert json.loads(json.dumps(t.to_dict())) == {"kind": "class_logit", "index": 3,
                                                   "name": "cat"}
    with pytest.raises(ValueError, match=r"0\.\.9"):
        ClassLogit(10)(OUT)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        ClassLogit(-1).check((5, 10))
    with pytest.raises(ValueError, match="shape"):
        ClassLogit(0).check((5, 10, 3, 3))
    with pytest.raises(ValueError, match="integer"):
        ClassLogit(1.5)


def test_class_probability():
    out = torch.randn(4, 10)
    t = ClassProbability(2)
    assert torch.allclose(t(out), torch.softmax(out, 1)[:, 2])
    assert "probability" in t.describe()
    with pytest.raises(ValueError, match=r"2 classes; use 0\.\.1"):
        t.check((4, 2))


def test_regression_output():
    assert torch.equal(RegressionOutput()(torch.tensor([[1.0], [2.0]])), torch.tensor([1.0, 2.0]))
    assert torch.equal(RegressionOutput()(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    assert torch.equal(RegressionOutput(1)(OUT), OUT[:, 1])
    with pytest.raises(ValueError, match=r"index.*0\.\.9"):
        RegressionOutput()(OUT)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        RegressionOutput(12).check((2, 10))
    assert RegressionOutput().describe() == "regression output"
    assert RegressionOutput(2).to_dict() == {"kind": "regression_output", "index": 2}


def test_output_containers():
    Out = namedtuple("Out", "logits")
    assert torch.equal(ClassLogit(1)(Out(OUT)), OUT[:, 1])
    assert torch.equal(ClassLogit(1)((OUT, torch.zeros(2, 10))), OUT[:, 1])
    with pytest.raises(ValueError, match="callable"):
        ClassLogit(1)({"a": OUT})


def test_custom_target():
    t = CustomTarget(lambda out: out[:, 3] - out[:, 5], name="cat-dog")
    assert torch.equal(t(OUT), torch.tensor([-2.0, -2.0]))
    assert t.describe() == "custom score cat-dog"
    json.dumps(t.to_dict())
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        CustomTarget(lambda out: out)(OUT)
    assert CustomTarget(lambda out: out[:, :1])(OUT).shape == (2,)


def test_resolve_ints_and_numbers():
    assert resolve_target(3) == ClassLogit(3)
    assert resolve_target(torch.tensor(3).item()) == ClassLogit(3)
    assert resolve_target(" 7 ") == ClassLogit(7)
    assert resolve_target(3, categories=CATS).describe() == "logit of class 3 (cat)"
    assert resolve_target("logit:4", CATS) == ClassLogit(4, "deer")


def test_resolve_names():
    assert resolve_target("Cat", CATS) == ClassLogit(3, "cat")
    assert resolve_target("prob:cat", CATS) == ClassProbability(3, "cat")
    assert resolve_target("prob:5") == ClassProbability(5)
    imagenet_like = ["tabby", "Egyptian cat", "crane", "crane"]
    assert resolve_target("egyptian cat", imagenet_like).index == 1
    with pytest.raises(ValueError, match="'cat'"):
        resolve_target("kat", CATS)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_target("crane", imagenet_like)
    with pytest.raises(ValueError, match="categories"):
        resolve_target("cat")


def test_resolve_regression_and_passthrough():
    assert resolve_target("output") == RegressionOutput()
    assert resolve_target("output:2") == RegressionOutput(2)
    assert resolve_target(None) == RegressionOutput()
    t = ClassProbability(1)
    assert resolve_target(t) is t

    def diff(out):
        return out[:, 0] - out[:, 1]

    wrapped = resolve_target(diff)
    assert isinstance(wrapped, Target) and wrapped.fn is diff
    assert "diff" in wrapped.describe()


def test_resolve_round_trip_through_dict():
    for t in (ClassLogit(3, "cat"), ClassProbability(0), RegressionOutput(), RegressionOutput(1)):
        d = json.loads(json.dumps(t.to_dict()))
        assert resolve_target(d) == t == target_from_dict(d)
    with pytest.raises(ValueError, match="callable again"):
        target_from_dict(CustomTarget(abs).to_dict())


def test_resolve_errors():
    for bad in ("", "softmax:3", "output:x", "prob:", 2.5, True, [1, 2]):
        with pytest.raises(ValueError):
            resolve_target(bad, CATS)


# --- class names against the model's own list ---------------------------------------------------

def test_single_folder_is_not_the_models_class_list():
    """A data folder holding only cat/ must not make 'cat' mean output 0 of a 10-class model."""
    with pytest.raises(ValueError, match=r"1 class folder but the model has 10 outputs.*"
                       r"target=3.*categories="):
        resolve_target_for_model("cat", data_classes=["cat"], n_outputs=10)
    from pcace.core.voice import speaking_cli

    with speaking_cli(), pytest.raises(ValueError, match=r"--target 3.*--categories"):
        resolve_target_for_model("cat", data_classes=["cat"], n_outputs=10)
    with pytest.raises(ValueError, match="cannot be matched"):
        resolve_target_for_model("cat", data_classes=["cat"])
    # the index still works, and is checked against the outputs before any pass
    t, cats = resolve_target_for_model(3, data_classes=["cat"], n_outputs=10)
    assert t == ClassLogit(3) and cats is None
    with pytest.raises(ValueError, match=r"0\.\.9"):
        resolve_target_for_model(12, n_outputs=10)


def test_full_folder_list_is_used():
    t, cats = resolve_target_for_model("cat", data_classes=CATS, n_outputs=10)
    assert t == ClassLogit(3, "cat") and cats.source == "data folders"
    assert describe_resolved(t, cats) == "logit of class 3 (cat; class names from the data folders)"


def test_model_and_declared_lists_win_over_folders():
    folders = sorted(CATS)  # same names in another order: the model's own order counts
    t, cats = resolve_target_for_model("cat", model_categories=CATS, data_classes=folders,
                                       n_outputs=10)
    assert t.index == 3 and cats.source == "model"
    assert "weights metadata" in describe_resolved(t, cats)
    declared = list(reversed(CATS))
    t, cats = resolve_target_for_model("prob:cat", model_categories=CATS, declared=declared,
                                       n_outputs=10)
    assert t == ClassProbability(6, "cat") and cats.source == "declared"
    t, _ = resolve_target_for_model("cat", model_categories=CATS, data_classes=["cat"],
                                    n_outputs=10)
    assert t.index == 3


def test_category_lists_must_fit_the_outputs():
    with pytest.raises(ValueError, match="declared class names number 3 but the model has 10"):
        choose_categories(declared=["a", "b", "c"], n_outputs=10)
    with pytest.raises(ValueError, match="model's class names number 10 but the model has 4"):
        choose_categories(model=CATS, n_outputs=4)
    assert choose_categories() is None
    assert choose_categories(data=CATS) is None  # unknown output count: folders unused
    assert choose_categories(model=CATS) == Categories(tuple(CATS), "model")


def test_describe_resolved():
    assert describe_resolved(ClassLogit(0)) == "logit of class 0 (no class names known)"
    assert describe_resolved(RegressionOutput(1)) == "regression output 1"
    t, cats = resolve_target_for_model("output", n_outputs=1)
    assert describe_resolved(t, cats) == "regression output"
