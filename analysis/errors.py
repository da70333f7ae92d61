"""The error type for unusable input to the analysis package.

``AnalysisError`` *is* moue's one user-error type, ``moue.errors.ConfigError`` (a subclass
kept for its name at the analysis call sites): it names the field, the value and what would be
accepted, in one line, so the command line prints it and exits with code 2 before anything is
written, and code that catches ``ConfigError`` catches it too.
"""

from __future__ import annotations

from moue.errors import ConfigError

__all__ = ["AnalysisError"]


class AnalysisError(ConfigError):
    """Unusable input to a fit or a report: ``field`` had ``value``; ``allowed`` says what is accepted."""
