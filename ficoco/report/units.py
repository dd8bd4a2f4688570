"""The FLOPs unit a table or figure shows: the one its magnitude needs, always named.

LLaVA-1.5 costs a few TFLOPs per sample, the toy model a few dozen MFLOPs; one fixed unit would print
0.00 for the toy. Values are stored in TFLOPs (the tidy table's `tflops_*` columns).
"""
from __future__ import annotations

import pandas as pd

UNITS = ((1.0, "TFLOPs"), (1e3, "GFLOPs"), (1e6, "MFLOPs"), (1e9, "kFLOPs"))


def flops_unit(largest_tflops: float) -> tuple[float, str]:
    """(factor from TFLOPs, unit name) so that the largest value reads at least 1."""
    for factor, unit in UNITS[:-1]:
        if largest_tflops * factor >= 1.0:
            return factor, unit
    return UNITS[-1]


def flops_unit_of(values) -> tuple[float, str]:
    """The unit of a set of TFLOPs values (NaNs ignored); TFLOPs when none is positive."""
    largest = pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce").max()
    return flops_unit(float(largest)) if pd.notna(largest) and largest > 0 else UNITS[0]
