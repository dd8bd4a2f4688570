"""`ficoco methods`: every method, where it acts, whether it needs attention, its stages and parameters."""
from __future__ import annotations

import argparse
import json

from ficoco import methods

SITE_NAMES = {
    "vision": "vision encoder layers (between attention and MLP)",
    "projector": "projector output",
    "llm": "LLM layers (layer input, prefill)",
}


def describe(method) -> str:
    """A plain-text block for one method."""
    where = "; ".join(SITE_NAMES[site] for site in method.acts_on) or "nowhere (unreduced)"
    lines = [
        f"{method.name}  [phase: {method.phase}]",
        f"  {method.summary}",
        f"  acts on:   {where}",
        f"  attention: {method.needs_attention}",
    ]
    lines += [f"  {stage:<10} {text}" for stage, text in method.stages.items()]
    if method.params:
        lines.append("  parameters (override with ficoco.apply(..., name=value)):")
        width = max(len(f"{name} = {param.default!r}") for name, param in method.params.items())
        lines += [f"    {f'{name} = {param.default!r}':<{width}}  {param.doc}" for name, param in method.params.items()]
    else:
        lines.append("  parameters: none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ficoco methods", description="List every token-reduction method.")
    parser.add_argument("names", nargs="*", help="only these methods (default: all)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    chosen = [methods.get(name) for name in (args.names or methods.names())]
    if args.json:
        print(json.dumps([{"name": m.name, "phase": m.phase, "acts_on": list(m.acts_on),
                           "needs_attention": m.needs_attention, "stages": dict(m.stages),
                           "defaults": m.defaults, "summary": m.summary} for m in chosen], indent=2))
    else:
        print("\n\n".join(describe(method) for method in chosen))
    return 0
