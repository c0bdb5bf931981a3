"""Errors a user can fix. Each message names the file, row, field or setting and what was expected."""
from __future__ import annotations


class UserError(ValueError):
    """Base of every error caused by input rather than by a bug."""


class DataError(UserError):
    """A data file or row is malformed."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        where = ", ".join(p for p in (
            f"file {file}" if file else None,
            f"row {row}" if row is not None else None,
            f"field {field!r}" if field else None,
        ) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.row, self.field, self.reason = file, row, field, message


class NonFiniteError(UserError):
    """A loss or reward became NaN/inf; the run stopped and kept its last good checkpoint."""
