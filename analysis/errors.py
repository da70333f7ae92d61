"""The error type for unusable input to the analysis package.

An ``AnalysisError`` names the field, the value and what would be accepted, in one line, so the
command line can print it and exit with code 2 before anything is written. (``analysis`` does not
import ``moue_core``; this mirrors ``moue_core.errors.ConfigError`` on purpose.)
"""

from __future__ import annotations

__all__ = ["AnalysisError"]


class AnalysisError(ValueError):
    """Unusable input: ``field`` had ``value``; ``allowed`` says what is accepted."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} ({value!r}) {allowed}")

    def __reduce__(self):  # picklable with its fields (see moue_core.errors.ConfigError)
        return (type(self), (self.field, self.value, self.allowed))
