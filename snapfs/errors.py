"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


def innermost(error: BaseException, kind: type = BaseException):
    """The first exception of `kind` in `error`, looking inside the exception
    groups that trio's nurseries wrap errors in; None if there is none."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = innermost(inner, kind)
            if found is not None:
                return found
        return None
    return error if isinstance(error, kind) else None
