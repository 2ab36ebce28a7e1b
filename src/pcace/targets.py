"""The public shortcut to :mod:`pcace.inputs.targets` and :mod:`pcace.inputs.categories`.

Everything here is defined there; nothing inside pcace imports this module.
"""

from .inputs.categories import (
    Categories,
    choose_categories,
    describe_resolved,
    resolve_target_for_model,
)
from .inputs.targets import (
    ClassLogit,
    ClassProbability,
    CustomTarget,
    RegressionOutput,
    Target,
    TargetSet,
    resolve_target,
    resolve_targets,
    target_from_dict,
    target_label,
)

__all__ = ["Categories", "choose_categories", "ClassLogit", "ClassProbability", "CustomTarget",
           "describe_resolved", "RegressionOutput", "resolve_target",
           "resolve_target_for_model", "resolve_targets", "Target", "target_from_dict",
           "target_label", "TargetSet"]
