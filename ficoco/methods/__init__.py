"""The method registry: `get(name)` and `names()`.

Built once at import from the method modules and never mutated. `ficoco.apply` also accepts a
`Method` object directly, which is how a new or experimental method is tried without touching
the registry. Names use hyphens; `get` also accepts underscores (`ficoco_v` = `ficoco-v`).
"""
from __future__ import annotations

from types import MappingProxyType

from ficoco.budget_labels import ADAPTIVE, FULL, RUN_LABELS, ImageTokens, image_tokens, is_run_label, tflops_target
from ficoco.methods import downsample, evit, ficoco_l, ficoco_v, ficoco_v_code, ficoco_vl, tome, vanilla
from ficoco.methods import dart, fastv, pdrop, sparsevlm
from ficoco.methods import cdpruner, divprune, fitprune, pooling, prumerge, random_keep, topk_cls, visionzip, vispruner, vscan
from ficoco.contract import LLMKept, LLMLayerStep, LLMTokens, VisionLayerStep, VisionTokens
from ficoco.methods.base import Method, Param

_REGISTRY = MappingProxyType({
    method.name: method
    for method in (vanilla.METHOD, ficoco_v.METHOD, ficoco_l.METHOD, ficoco_vl.METHOD, ficoco_v.OFFICIAL,
                   ficoco_v_code.METHOD, tome.METHOD, evit.METHOD, downsample.METHOD,
                   fastv.METHOD, fastv.KEEP_BUDGET, pdrop.METHOD, pdrop.OFFICIAL, dart.METHOD, sparsevlm.METHOD,
                   sparsevlm.MATCHED,
                   visionzip.METHOD, vispruner.METHOD, prumerge.METHOD, prumerge.PLUS, prumerge.ADAPTIVE,
                   prumerge.PLUS_ADAPTIVE, topk_cls.METHOD, random_keep.METHOD,
                   pooling.METHOD, divprune.METHOD, cdpruner.METHOD, vscan.METHOD, fitprune.METHOD)
})


def budget_from_label(method, label) -> int | ImageTokens | None:
    """A grid budget label as `ficoco.apply`'s budget, checked against the method.

    "full" -> None (unreduced); "adaptive" -> None (the adaptive reduction of a method with
    `budgeted=False`); a positive integer -> that budget; "n600" -> ImageTokens(600) (600 tokens for
    every image, Qwen2-VL family). ValueError when the label does not fit
    the method: an adaptive method runs only as "adaptive", a budgeted one never does; a TFLOPs
    label ("t2.4") names a target, which the grid solves into a token budget before a job runs.
    """
    method, label = get(method), str(label)
    if tflops_target(label) is not None:
        raise ValueError(f"budget {label!r} is a TFLOPs target; a job runs the token budget the grid solved for it "
                         f"(`ficoco grid` prints it): pass that integer")
    if not is_run_label(label):
        raise ValueError(f"budget {label!r}: valid values are {RUN_LABELS}")
    if not method.budgeted and label != ADAPTIVE:
        raise ValueError(f"{method.name}: an adaptive method takes no budget; its budget label is '{ADAPTIVE}', "
                         f"got {label!r}")
    if method.budgeted and label == ADAPTIVE:
        raise ValueError(f"{method.name}: budget label '{ADAPTIVE}' is only for adaptive methods "
                         f"({', '.join(name for name in _REGISTRY if not _REGISTRY[name].budgeted)}); use "
                         f"'{FULL}' or a positive integer")
    if label in (FULL, ADAPTIVE):
        return None
    return image_tokens(label) or int(label)


def budget_label(method, budget: int | ImageTokens | None) -> str:
    """The grid label of an API budget: the integer as text; a per-image count as "n<tokens>"; None ->
    "adaptive" for an adaptive method, else "full"."""
    if isinstance(budget, ImageTokens):
        return budget.label
    if budget is not None:
        return str(int(budget))
    return FULL if get(method).budgeted else ADAPTIVE


def names() -> list[str]:
    """Every registered method name, in registry order."""
    return list(_REGISTRY)


def get(name: str) -> Method:
    """The method called `name` (hyphens or underscores); ValueError naming the valid choices."""
    if isinstance(name, Method):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


__all__ = ["get", "names", "budget_from_label", "budget_label", "FULL", "ADAPTIVE", "Method", "Param",
           "VisionLayerStep", "LLMLayerStep", "VisionTokens", "LLMTokens", "LLMKept"]
