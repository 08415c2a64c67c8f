"""Policies: the contract every model implements (:class:`Policy`), what the diffusers-backed ones share
(:class:`PipelinePolicy`), and one module per model.

Every module of this package is imported here and its policies exported, so a new model is one new file: its class
is found by its short ``class_path`` (``QwenImagePolicy`` or ``precise_lightning.policies.QwenImagePolicy``) and
listed by :func:`pipeline_policies` (the tiny-model writer and the tests read that list) without editing one.
"""

from __future__ import annotations

import importlib
import pkgutil

from precise_lightning.policies.base import Policy, slice_cond
from precise_lightning.policies.pipeline import PipelinePolicy

__all__ = ["PipelinePolicy", "Policy", "pipeline_policies", "slice_cond"]

for _module in pkgutil.iter_modules(__path__):
    for _name, _value in vars(importlib.import_module(f"{__name__}.{_module.name}")).items():
        if (isinstance(_value, type) and issubclass(_value, Policy) and _value.__module__.startswith(__name__)
                and _name not in __all__):
            globals()[_name] = _value
            __all__.append(_name)


def pipeline_policies() -> list[type[PipelinePolicy]]:
    """Every model policy on a diffusers pipeline (the subclasses that name a ``hub_id``), by class name."""
    found, stack = [], [PipelinePolicy]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            if "hub_id" in vars(cls):
                found.append(cls)
    return sorted(set(found), key=lambda cls: cls.__name__)
