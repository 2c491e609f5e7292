"""Exceptions with a fixed mapping to exit codes.

``OnnxCompressError`` (exit 2) is any bad input or usage: a missing or malformed model, bad feeds, an
unsafe external-data reference, an output path that would lose data. ``ValidationFailed`` (exit 1)
means the compressed model was built but does not meet the requested tolerances. Messages are one
line and say what to do about it.
"""

from __future__ import annotations

from typing import Any


class OnnxCompressError(Exception):
    """Bad input or usage. The CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class ValidationFailed(OnnxCompressError):
    """The candidate model does not meet the tolerances. The CLI exits with code 1.

    Attributes:
        report: The report (validation or compression) that failed, for rendering.
    """

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
