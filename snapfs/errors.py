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


#: longest error text kept (it goes into status and the copy map's header)
MAX_ERROR_CHARS = 500


def describe(error: BaseException) -> str:
    """One short line for the first error in `error`."""
    error = innermost(error)
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error) or type(error).__name__
    return text[:MAX_ERROR_CHARS]
