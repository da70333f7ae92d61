"""The one error type for bad user input anywhere in moue.

A ``ConfigError`` names the field, the value and what would be accepted, in one line, so the
command line can print it and exit with code 2 before anything is launched or written.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Invalid user input: ``field`` had ``value``; ``allowed`` says what is accepted."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} ({value!r}) {allowed}")

    def __reduce__(self):
        # picklable with its three fields: raised in a Ray worker, it reaches the driver (and
        # MLflow's stop reason) as itself, not as "TypeError: __init__() missing 2 arguments"
        return (type(self), (self.field, self.value, self.allowed))
