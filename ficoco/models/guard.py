"""The transformers version guard: the adapter refuses a version it was not tested on.

The adapters hook transformers internals (keyword names, cache objects, the generate loop)
that change between releases without notice, and a change shows up as wrong token counts, not as
an error (platform-notes §1.1). So `ficoco.apply` first calls `require_tested_transformers()`:

- installed version in `TESTED_TRANSFORMERS`: proceed;
- otherwise: RuntimeError (one line: installed version, tested versions, the override variable);
- with `FICOCO_ALLOW_UNTESTED_TRANSFORMERS=1`: log a warning, run the self-check of the model's adapter
  (ficoco/models/selfcheck.py: LLaVA's, or Qwen2-VL's on each of its model classes; once per process per
  version and family) and proceed only if every check passes.

Widen `TESTED_TRANSFORMERS` only after the test suite passes on the new version.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

TESTED_TRANSFORMERS: tuple[str, ...] = ("5.23.0", "5.24.0")
OVERRIDE_VARIABLE = "FICOCO_ALLOW_UNTESTED_TRANSFORMERS"
_OVERRIDE_VALUES = {"1": True, "0": False, "": False}


@dataclass(frozen=True)
class TransformersStatus:
    installed: str
    tested_versions: tuple[str, ...]
    override: bool                     # FICOCO_ALLOW_UNTESTED_TRANSFORMERS=1

    @property
    def tested(self) -> bool:
        return self.installed in self.tested_versions

    @property
    def allowed(self) -> bool:
        """Tested, or untested with the override set (the self-check then decides)."""
        return self.tested or self.override

    def untested_message(self) -> str:
        return (f"transformers {self.installed} is not a version the ficoco adapters were tested on "
                f"(tested: {', '.join(self.tested_versions)}); install a tested version (requirements/lock.txt) "
                f"or set {OVERRIDE_VARIABLE}=1 to proceed after the adapter self-check")


def override_set() -> bool:
    """Whether FICOCO_ALLOW_UNTESTED_TRANSFORMERS=1; any value other than 1, 0 or empty is an error."""
    value = os.environ.get(OVERRIDE_VARIABLE, "").strip()
    if value not in _OVERRIDE_VALUES:
        raise RuntimeError(f"{OVERRIDE_VARIABLE}={value!r}; valid values: 1 (allow an untested transformers after "
                           f"the self-check), 0 or unset (refuse)")
    return _OVERRIDE_VALUES[value]


def transformers_status() -> TransformersStatus:
    """The installed transformers version (read now) against the tested ones, and the override."""
    import transformers

    return TransformersStatus(transformers.__version__, TESTED_TRANSFORMERS, override_set())


def require_tested_transformers(family: str = "llava") -> None:
    """Return when the adapter of `family` (a key of `selfcheck.FAMILIES`: the self-check run on an untested
    version) may run on the installed transformers; raise RuntimeError (one line) if not."""
    from ficoco.models.selfcheck import selfcheck_once

    status = transformers_status()
    if status.tested:
        return
    if not status.override:
        raise RuntimeError(status.untested_message())
    log.warning("transformers %s is not a tested version (tested: %s); %s=1 is set, so the adapter self-check "
                "decides", status.installed, ", ".join(status.tested_versions), OVERRIDE_VARIABLE)
    result = selfcheck_once(status.installed, family)
    failure = result.first_failure
    if failure is not None or not result.passed:
        detail = failure.line() if failure is not None else f"only {len(result.checks)} checks ran"
        raise RuntimeError(f"transformers {status.installed} (untested, {OVERRIDE_VARIABLE}=1) failed the ficoco "
                           f"adapter self-check, so ficoco refuses to run on it: {detail}")
    log.warning("transformers %s passed the adapter self-check (%d checks, %.1f s); proceeding on an untested "
                "version", status.installed, len(result.checks), result.seconds)
