"""`ficoco methods`: every method, where it acts, whether it needs attention, its stages and parameters."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ficoco import methods
from ficoco.contract import Needs


def sites(method) -> list[str]:
    """Where the method acts, from the reduction steps it builds for LLaVA-1.5-7B at its default settings
    (a calibrated method builds none before its fit and says where it acts once fitted)."""
    from ficoco.dims import llava_1_5_dims

    if method.calibrated:
        return [method.fitted_where]
    dims = llava_1_5_dims("7b")
    for budget in (128, 192, 64, dims.visual_tokens, None):
        try:
            steps = method.steps(method.plan(dims, budget))
        except ValueError:
            continue
        return list(dict.fromkeys(step.WHERE for step in steps))
    return list(method.acts_on)


def needs_text(needs: Needs) -> str:
    """What a method assumes of an image's layout, in words (ficoco.contract.Needs)."""
    words = [text for wanted, text in ((needs.cls_first, "a CLS token first in the tower"),
                                       (needs.square_grid, "a square patch grid")) if wanted]
    if set(needs.positions) != set(Needs().positions):
        words.append(f"{' or '.join(needs.positions)} LLM positions")
    if words and needs.remedy:
        words.append(needs.remedy)
    return ", ".join(words) or "nothing of the image layout"


def describe(method) -> str:
    """A plain-text block for one method."""
    where = "; ".join(sites(method)) or "nowhere (unreduced)"
    lines = [
        f"{method.name}  [phase: {method.phase}]",
        f"  {method.summary}",
        f"  acts on:   {where}",
        f"  attention: {method.needs_attention}",
        f"  needs:     {needs_text(method.needs_for({}))}"      # with its default parameters
        + ("; the CLIP text tower of the vision tower's checkpoint (the model's clip/; "
           "ficoco.apply(..., text_tower=...))" if method.needs_text_tower else ""),
    ]
    if not method.budgeted:
        lines.append("  budget:    none (adaptive: a token count per image, realised counts logged; grid label "
                     "'adaptive')")
    lines += [f"  {stage:<10} {text}" for stage, text in method.stages.items()]
    if method.params:
        lines.append("  parameters (override with ficoco.apply(..., name=value)):")
        width = max(len(f"{name} = {param.default!r}") for name, param in method.params.items())
        lines += [f"    {f'{name} = {param.default!r}':<{width}}  {param.doc}" for name, param in method.params.items()]
    else:
        lines.append("  parameters: none")
    return "\n".join(lines)


def markdown_table(chosen) -> str:
    """The paradigm view of the whole family: method x where x filter / correlate / compress."""
    rows = ["| method | where | attention | filter | correlate | compress |", "|---|---|---|---|---|---|"]
    for method in chosen:
        cells = [f"`{method.name}`", "; ".join(sites(method)) or "–", method.needs_attention]
        cells += [method.stages.get(stage, "–") for stage in ("filter", "correlate", "compress")]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco methods", description="List every token-reduction method.")
    parser.add_argument("names", nargs="*", help="only these methods (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--markdown", action="store_true", help="one table: method x where x stages")
    args = parser.parse_args(argv)
    chosen = [methods.get(name) for name in (args.names or methods.names())]
    if args.json:
        print(json.dumps([{"name": m.name, "phase": m.phase, "acts_on": list(m.acts_on), "where": sites(m),
                           "needs_attention": m.needs_attention, "needs": asdict(m.needs_for({})),
                           "needs_text_tower": m.needs_text_tower, "budgeted": m.budgeted,
                           "stages": dict(m.stages),
                           "defaults": m.defaults, "summary": m.summary} for m in chosen], indent=2))
    elif args.markdown:
        print(markdown_table(chosen))
    else:
        print("\n\n".join(describe(method) for method in chosen))
    return 0
