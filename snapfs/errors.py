"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A problem with what the user asked for; the message is shown as is."""
