"""Errors that the user can fix, kept apart from bugs so front ends can show one clean line."""


class UserError(Exception):
    """Bad input or environment: the CLI exits 2 and the dashboard shows ``st.error`` with this text."""
