"""The method registry: `get(name)` and `names()`.

Built once at import from the method modules and never mutated. `ficoco.apply` also accepts a
`Method` object directly, which is how a new or experimental method is tried without touching
the registry. Names use hyphens; `get` also accepts underscores (`ficoco_v` = `ficoco-v`).
"""
from __future__ import annotations

from types import MappingProxyType

from ficoco.methods import downsample, evit, ficoco_l, ficoco_v, ficoco_vl, tome, vanilla
from ficoco.methods import dart, fastv, pdrop, sparsevlm
from ficoco.methods import divprune, pooling, prumerge, random_keep, topk_cls, visionzip
from ficoco.methods.base import LLMKept, LLMLayerStep, LLMTokens, Method, Param, VisionLayerStep, VisionTokens

_REGISTRY = MappingProxyType({
    method.name: method
    for method in (vanilla.METHOD, ficoco_v.METHOD, ficoco_l.METHOD, ficoco_vl.METHOD, ficoco_v.OFFICIAL,
                   tome.METHOD, evit.METHOD, downsample.METHOD,
                   fastv.METHOD, fastv.KEEP_BUDGET, pdrop.METHOD, pdrop.OFFICIAL, dart.METHOD, sparsevlm.METHOD,
                   visionzip.METHOD, prumerge.METHOD, prumerge.PLUS, topk_cls.METHOD, random_keep.METHOD,
                   pooling.METHOD, divprune.METHOD)
})


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


__all__ = ["get", "names", "Method", "Param", "VisionLayerStep", "LLMLayerStep", "VisionTokens", "LLMTokens",
           "LLMKept"]
