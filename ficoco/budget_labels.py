"""Budget labels: the one place that knows how a grid budget is written (it is a path part, `b{label}`).

    "full"            the unreduced model (vanilla)
    "adaptive"        an adaptive method's one run (it chooses a count per image)
    "128"             a token budget: average visual tokens per LLM decoder layer (on a model whose images
                      differ in size, of its nominal image: every image keeps that fraction of its own)
    "n600"            a token count for every image, whatever its size (Qwen2-VL family): each image keeps
                      600 visual tokens per LLM layer on average, or all of its own when it has fewer
    "t2.4"            a TFLOPs target under the exact convention (solved per model and method)
    "t1.5-nominal"    a TFLOPs target under the paper's nominal convention

A TFLOPs label names a target, not a token count: each (model, method) runs the token budget
`ficoco.flops.solve_tflops_budget` finds for it, so two methods under one label may run different
token counts at the same cost.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

FULL = "full"
ADAPTIVE = "adaptive"
TFLOPS_CONVENTIONS = ("exact", "nominal")
NOMINAL_SUFFIX = "-nominal"
# "t2.4", "t1.5-nominal": the target and the convention; written as `TflopsTarget.label` prints it (no leading or
# trailing zero: "t2.40" or "t02.4" would be a second key for one budget)
TFLOPS_PATTERN = r"t((?:0|[1-9]\d*)(?:\.\d*[1-9])?)(-nominal)?"
IMAGE_TOKENS_PATTERN = r"n([1-9]\d*)"                 # "n600": 600 tokens for every image
#: the labels a path part may hold (Snakemake's wildcard constraint for {budget})
LABEL_PATTERN = r"full|adaptive|[1-9]\d*|" + IMAGE_TOKENS_PATTERN + "|" + TFLOPS_PATTERN
VALID_LABELS = ("'full', 'adaptive', a positive integer, a token count for every image written n<tokens> "
                "(e.g. n600), or a TFLOPs target written t<TFLOPs> (exact convention) or t<TFLOPs>-nominal, e.g. t2.4")


@dataclass(frozen=True)
class ImageTokens:
    """A budget of `tokens` visual tokens (average per LLM layer) for every image, whatever its size; an image
    with fewer keeps all of its own. The paper's "600 / 500 / 400 tokens" on Qwen2-VL. The plain integer budget
    is the other form: a count on the nominal image, a kept fraction of every other."""

    tokens: int

    def __post_init__(self):
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"image tokens {self.tokens!r}: valid: an integer >= 1")

    @property
    def label(self) -> str:
        return f"n{self.tokens}"

    def describe(self) -> str:
        return f"{self.tokens} tokens an image"


@dataclass(frozen=True)
class TflopsTarget:
    """A budget stated as a cost: `tflops` per sample under `convention` (flops.md: exact | nominal)."""

    tflops: float
    convention: str = "exact"

    def __post_init__(self):
        if self.convention not in TFLOPS_CONVENTIONS:
            raise ValueError(f"convention {self.convention!r} is not known; valid: {', '.join(TFLOPS_CONVENTIONS)}")
        if isinstance(self.tflops, bool) or not self.tflops > 0:
            raise ValueError(f"tflops {self.tflops!r} is not a cost; valid: a number > 0")

    @property
    def digits(self) -> str:
        """The target as positional decimal text ("2.4", "0.00003", never "3e-05"): it is a path part
        and must round-trip."""
        return format(Decimal(repr(float(self.tflops))).normalize(), "f")

    @property
    def label(self) -> str:
        return f"t{self.digits}" + (NOMINAL_SUFFIX if self.convention == "nominal" else "")

    @property
    def tolerance(self) -> float:
        """Half a unit in the last decimal place written (2.4 -> 0.05): a cost that rounds to the
        target as written meets it (the paper's labels are rounded costs)."""
        exponent = Decimal(repr(float(self.tflops))).as_tuple().exponent
        return 0.5 * 10.0 ** exponent

    def describe(self) -> str:
        return f"{self.digits} TFLOPs ({self.convention})"


def is_label(text) -> bool:
    """True for a budget label as written in paths (see the module docstring)."""
    return isinstance(text, str) and re.fullmatch(LABEL_PATTERN, text) is not None


RUN_LABELS = "'full', 'adaptive', a positive integer or n<tokens> (a count for every image)"


def is_run_label(text) -> bool:
    """True for a label a job runs (RUN_LABELS): any label but a TFLOPs target, which the grid solves into a
    token budget first."""
    return is_label(text) and tflops_target(text) is None


def tflops_target(label: str) -> TflopsTarget | None:
    """The target a TFLOPs label names ("t2.4" -> 2.4 exact); None for any other label."""
    match = re.fullmatch(TFLOPS_PATTERN, str(label))
    if match is None:
        return None
    return TflopsTarget(float(match.group(1)), "nominal" if match.group(2) else "exact")


def image_tokens(label: str) -> ImageTokens | None:
    """The per-image count a label names ("n600" -> ImageTokens(600)); None for any other label."""
    match = re.fullmatch(IMAGE_TOKENS_PATTERN, str(label))
    return None if match is None else ImageTokens(int(match.group(1)))


def is_token_budget(label: str) -> bool:
    """True for a label that is itself a token count ("128")."""
    return str(label).isdigit() and int(label) > 0


def sort_key(label: str) -> tuple:
    """Token budgets largest first, then per-image counts largest first, then TFLOPs targets largest first
    (exact before nominal), then "adaptive", "full" last."""
    target, per_image = tflops_target(label), image_tokens(label)
    if is_token_budget(label):
        return (0, -int(label), "")
    if per_image is not None:
        return (1, -per_image.tokens, "")
    if target is not None:
        return (2, -target.tflops, target.convention)
    return (3 if label == ADAPTIVE else 4, 0, "")


def describe(label: str) -> str:
    """How a report names a budget: "2.4 TFLOPs (exact)" for a TFLOPs label, "600 tokens an image" for a
    per-image count, any other label as is."""
    named = tflops_target(label) or image_tokens(label)
    return label if named is None else named.describe()


def run_label_problem(label: str | None, run_budget: str) -> str | None:
    """Why a job's `--budget-label` cannot name its `--budget` (None when it can): a label differs from
    the budget a job runs only when it is a TFLOPs target, which the grid solved into that budget."""
    if label in (None, run_budget):
        return None
    if tflops_target(label) is None:
        return (f"--budget-label {label!r} differs from --budget {run_budget!r}; valid: the same label, or a TFLOPs "
                f"target's label (t2.4, t1.5-nominal) that the grid solved into --budget")
    if not is_token_budget(run_budget):
        return f"--budget-label {label!r} is a TFLOPs target; valid: --budget the token budget the grid solved for it"
    return None
