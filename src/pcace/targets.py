"""The public shortcut to :mod:`pcace.inputs.targets` (its names, under the path users know).

Everything here is defined in :mod:`pcace.inputs.targets`; nothing inside pcace imports this module.
"""

from .inputs.targets import (
    Categories,
    ClassLogit,
    ClassProbability,
    CustomTarget,
    RegressionOutput,
    Target,
    TargetSet,
    choose_categories,
    describe_resolved,
    resolve_target,
    resolve_target_for_model,
    resolve_targets,
    target_from_dict,
    target_label,
)

__all__ = ["Categories", "choose_categories", "ClassLogit", "ClassProbability", "CustomTarget",
           "describe_resolved", "RegressionOutput", "resolve_target",
           "resolve_target_for_model", "resolve_targets", "Target", "target_from_dict",
           "target_label", "TargetSet"]
