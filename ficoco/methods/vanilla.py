"""vanilla: the unreduced model. Installs no reduction; the adapter still records token counts."""
from __future__ import annotations

from ficoco.methods.base import Method
from ficoco.methods.shared import delivered_plan


def schedule(dims, budget, params) -> dict:
    # any budget label is accepted and ignored: vanilla is the unreduced reference (contracts §3)
    delivered = dims.visual_tokens
    return delivered_plan(dims, delivered)


METHOD = Method(
    name="vanilla",
    summary="the unreduced model (token counts are still recorded)",
    phase="none",
    acts_on=(),
    needs_attention="none",
    stages={"filter": "none", "correlate": "none", "compress": "none"},
    params={},
    schedule=schedule,
    build=lambda plan: (),
)
