"""What a token-reduction method is, independent of any model family: `Method` and `Param`.

A `Method` says *what* happens and *where*: `schedule(dims, budget, params) -> plan` turns a budget
into per-layer counts without a model, and `build(plan)` turns the plan into reduction steps, the
types of the method/adapter contract (ficoco/contract.py). A model adapter (ficoco/models) says
*how* to get the hidden states and attention at each step's site. Pieces more than one method uses
live in ficoco/methods/shared.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ficoco.contract import Needs, Plan, Step, unmet_needs
from ficoco.budget import span_budget
from ficoco.dims import PER_PASS_PHASES, image_plan, pass_budget

PHASES = ("none", "vision", "projector", "llm", "both")
SITES = ("vision", "projector", "llm")


# ------------------------------------------------------------------------------------------------
# Parameters

@dataclass(frozen=True)
class Param:
    """One hyperparameter: default, a one-line description, and a check returning an error or None."""

    default: Any
    doc: str
    check: Callable[[Any], str | None]


def unit_interval(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
    return None if ok else "must be a number in [0, 1]"


def positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) > 0 and math.isfinite(value)
    return None if ok else "must be a finite number > 0"


def positive_int(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an integer >= 1"


def non_negative_int(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "must be an integer >= 0"


def optional_non_negative_int(value) -> str | None:
    return None if value is None else non_negative_int(value)


def one_of(choices: tuple) -> Callable[[Any], str | None]:
    """The check of a parameter that takes one of `choices`."""
    def check(value) -> str | None:
        return None if value in choices else f"must be one of {list(choices)}"
    return check


# ------------------------------------------------------------------------------------------------
# Method

@dataclass(frozen=True)
class Method:
    """A named token-reduction method: where it acts, what it needs, its stages and parameters.

    `schedule(dims, budget, params) -> plan` turns a budget into per-layer counts without a model;
    `build(plan) -> tuple[Step, ...]` turns a plan into the reduction steps an adapter installs.

    `budgeted=False` marks an *adaptive* method (PruMerge's IQR originals): it chooses its token count
    per image, so it takes no budget. `plan(dims, None)` plans its adaptive reduction (the plan's
    "delivered", "llm_visual" and "layer_average" are None: the counts exist only once a run has
    realised them, `handle.last_counts()`), and any other budget is a ValueError naming the method.
    The grid runs such a method once, under the budget label "adaptive".

    `needs_text_tower=True` marks a method that reads each prompt's instruction through CLIP's text
    tower (CDPruner): `ficoco.apply(..., text_tower=...)` hands it the companion model
    (ficoco/models/companion.py), which the pipeline loads from the model directory's `clip/`.

    `tower_schedule(dims, budget, params)` and `llm_schedule(dims, delivered, budget, params)` (a method
    that reduces in both the tower and the LLM, FiCoCo-VL, whose `schedule` is the two in turn): the tower
    part's plan entries ("vision", "vision_counts", "delivered") for one image at `budget`, and the LLM
    part's ("llm", "llm_visual", "layer_average", ...) for `delivered` visual tokens arriving at the LLM.
    With them the method runs on images of several crops (LLaVA-NeXT): the tower part on each crop, the
    LLM part on the crops' tokens (`ficoco.dims.passes_plan`).

    `calibrated=True` marks a method whose plan for a budget needs parameters fitted on calibration
    prompts (FitPrune's deletion schedule): the pipeline fits them per model and budget (rule
    `calibrate`, `ficoco calibrate`) and each job reads the artifact (`ficoco run --calibration`).
    """

    name: str
    summary: str
    phase: str                                  # "none" | "vision" | "projector" | "llm" | "both"
    acts_on: tuple[str, ...]                    # subset of SITES
    needs_attention: str                        # which attention probabilities, in words
    stages: Mapping[str, str]                   # filter / correlate / compress -> one line each
    params: Mapping[str, Param]
    schedule: Callable[[Any, int | None, dict], dict]   # the plan's entries, made a `Plan` by `plan`
    build: Callable[[Plan], tuple[Step, ...]]
    budgeted: bool = True                       # False: adaptive, a count per image and no budget
    calibrated: bool = False                    # True: a budget's plan needs parameters fitted on calibration
                                                # data first (`ficoco calibrate`, FitPrune's deletions)
    fitted_where: str = ""                      # a calibrated method: where its fitted steps act, in words
                                                # (`ficoco methods`; it builds none before its fit)
    needs: Needs | Callable[[Mapping[str, Any]], Needs] = Needs()   # what it assumes of an image's layout
                                                # (ficoco.contract), or a function of its resolved parameters
                                                # that says it (FiCoCo-V: a CLS token for semantic="cls" only)
    needs_text_tower: bool = False              # reads the instruction through the CLIP text tower of the vision
                                                # tower's checkpoint, a companion of the model (CDPruner)
    tower_schedule: Callable[[Any, int | None, dict], dict] | None = None      # phase "both": the tower part alone
    llm_schedule: Callable[[Any, int, int | None, dict], dict] | None = None   # phase "both": the LLM part alone

    def __post_init__(self):
        if (self.tower_schedule is None) != (self.llm_schedule is None) or self.llm_schedule and self.phase != "both":
            raise ValueError(f"{self.name}: tower_schedule and llm_schedule are the two parts of a method of phase "
                             f"'both', given together")
        if self.calibrated != bool(self.fitted_where):
            raise ValueError(f"{self.name}: a calibrated method, and only one, says where it acts once fitted "
                             f"(fitted_where)")
        if self.phase not in PHASES:
            raise ValueError(f"{self.name}: phase={self.phase!r}; valid phases are {list(PHASES)}")
        bad_sites = [site for site in self.acts_on if site not in SITES]
        if bad_sites:
            raise ValueError(f"{self.name}: acts_on {bad_sites} invalid; valid sites are {list(SITES)}")
        object.__setattr__(self, "stages", MappingProxyType(dict(self.stages)))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def defaults(self) -> dict:
        return {name: param.default for name, param in self.params.items()}

    def resolve(self, overrides: Mapping[str, Any]) -> dict:
        """Defaults updated by `overrides`; ValueError for an unknown key or a bad value."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "none (this method has no parameters)"
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; valid parameters: {valid}")
        params = self.defaults
        params.update(overrides)
        for name, value in params.items():
            error = self.params[name].check(value)
            if error:
                raise ValueError(f"{self.name}: {name}={value!r} {error} ({self.params[name].doc})")
        return params

    def plan(self, dims, budget: int | None, **overrides) -> Plan:
        """The `ficoco.contract.Plan` (`to_dict()` for JSON) for `budget` on a model of shape `dims` (ficoco.dims.ModelDims).

        Raises ficoco.budget.InfeasibleBudget (a ValueError) when the budget cannot be reached, and
        ValueError for unknown or bad overrides, an out-of-range budget, or a model whose image layout
        lacks what the method needs (`needs`, ficoco/contract.py).
        """
        if budget is not None and not self.budgeted:
            raise ValueError(f"{self.name}: an adaptive method takes no budget (it chooses its token count per "
                             f"image and logs the realised count); got budget {budget!r}. Use budget None (the "
                             f"grid's budget label 'adaptive')")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise ValueError(f"{self.name}: budget must be an integer number of visual tokens or None; got {budget!r}")
            if not 1 <= budget <= dims.visual_tokens:
                raise ValueError(f"{self.name}: budget {budget} must be in [1, {dims.visual_tokens}] "
                                 f"(the model's visual tokens), or None for unreduced")
        unmet = self.unmet_needs(dims, **overrides)
        if unmet:
            raise ValueError(f"{self.name} cannot run on this model: it needs {'; '.join(unmet)}")
        params = self.resolve(overrides)
        plan = self.schedule(dims, budget, params)
        return Plan.from_schedule(self.name, self.phase, budget, params, plan)

    def needs_for(self, overrides: Mapping[str, Any]) -> Needs:
        """What the method assumes of an image's layout with these parameter overrides."""
        return self.needs(self.resolve(overrides)) if callable(self.needs) else self.needs

    def unmet_needs(self, dims, **overrides) -> list[str]:
        """What the model of shape `dims` lacks of this method's needs, in words ([] when it can run).

        On images of several crops (LLaVA-NeXT) the adapter reduces each crop in or right after the tower,
        or the whole span inside the LLM (a fitted schedule scaled to each span), or both (a method with its
        two parts): one that acts in the tower and the LLM without its parts needs one crop there, for now
        (docs/contracts.md §3)."""
        layout = dims.image_layout()
        unmet = unmet_needs(self.needs_for(overrides), layout)
        both_without_parts = self.phase == "both" and self.llm_schedule is None
        if both_without_parts and len(layout.crops) > 1:
            unmet.append(f"one crop per image (this model encodes {len(layout.crops)}; on multi-crop images only "
                         f"reductions of each crop, inside the LLM, or both with their two parts stated, run so far)")
        return unmet

    def check_budget(self, dims, budget: int | None, **overrides) -> Plan:
        """Validate a (budget, overrides) pair without a model; returns the planned schedule. On a model with
        several crops per image (LLaVA-NeXT), the plan of its costliest image, the largest canvas
        (`ficoco.dims.image_plan`: a budget of the nominal image, kept per pass or per span)."""
        if not dims.image_grid_pinpoints:
            return self.plan(dims, budget, **overrides)
        unmet = self.unmet_needs(dims, **overrides)
        if unmet:
            raise ValueError(f"{self.name} cannot run on this model: it needs {'; '.join(unmet)}")
        layout = dims.anyres_layout(*dims.largest_canvas)
        try:
            return image_plan(self, dims, [layout], budget, **overrides)
        except ValueError as error:        # say what the method was asked for on one pass or span
            if budget is None or not 1 <= budget <= dims.visual_tokens:
                raise
            share = pass_budget(dims, budget)
            if self.phase in PER_PASS_PHASES:
                where = f"{share} a tower pass"
            elif self.phase == "both":
                where = f"{share} a tower pass, {share * layout.tower_passes} in the LLM for its largest image's " \
                        f"passes"
            else:
                span = layout.delivered
                where = f"{span_budget(budget, span, dims.visual_tokens)} of the {span} tokens of its largest image"
            raise type(error)(f"{str(error).rstrip('.')} (budget {budget} of the nominal {dims.visual_tokens}-token "
                              f"image is {where})") from None

    def steps(self, plan: Plan) -> tuple[Step, ...]:
        """The reduction steps that realise `plan` (returned by `plan`)."""
        return self.build(plan)
