"""Errors that the user can fix, kept apart from bugs so front ends can show one clean line."""

DEBUG_ENV = "PIPELINE_DEBUG"  # set: internal errors in full, and Ray's own logs and stack traces (``cluster``)


class UserError(Exception):
    """Bad input or environment: the CLI exits 2 and the dashboard shows ``st.error`` with this text."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line reports."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
