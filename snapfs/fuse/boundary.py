"""The one place where errors become FUSE error codes.

Only `FUSEError` may leave a pyfuse3 handler: anything else ends
`pyfuse3.main()` and leaves the mount dead ("Transport endpoint is not
connected"). `ErrorBoundary` wraps every handler a subclass defines, so no
handler can be added without it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging

import pyfuse3

log = logging.getLogger("snapfs")

#: the request handlers pyfuse3 calls (its Operations' public coroutines)
HANDLERS = frozenset(name for name, member in vars(pyfuse3.Operations).items()
                     if not name.startswith("_") and inspect.iscoroutinefunction(member))


def fuse_errors(handler):
    """Turn any error leaving `handler` into FUSEError: OSError keeps its
    errno, anything else is logged with its traceback and becomes EIO."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            log.warning("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.error_boundary = True
    return wrapper


class ErrorBoundary(pyfuse3.Operations):
    """Operations whose every handler is wrapped in `fuse_errors`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in HANDLERS & vars(cls).keys():
            handler = vars(cls)[name]
            if not getattr(handler, "error_boundary", False):
                setattr(cls, name, fuse_errors(handler))
