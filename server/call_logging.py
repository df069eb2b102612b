"""gRPC's ERROR about a reply that could not be sent because the call had already ended, demoted.

When core fails an operation on a call (a reply, or the final status) because the client cancelled
it, its deadline passed or the client went away, grpc.aio ignores the failure once it has handled
core's separate notice that the call was cancelled. Both arrive together, in either order; when
the failure comes first, grpc.aio logs

    ERROR grpc._cython.cygrpc: ExecuteBatchError raised in core by servicer method [/pkg.Svc/M]

with a 9-line traceback, though nothing failed in the server. Streams never reach that branch (the
metrics interceptor writes their replies and waits for the cancel: _handlers.write_replies), but
a unary reply or any final status is sent by gRPC after the handler has returned, where no handler
can wait. EndedCallFilter turns exactly that record, for exactly that failure, into a DEBUG line
without a traceback, as gRPC logs the same event when the notice comes first ("RPC cancelled for
servicer method"). Every other record keeps its level and its traceback.
"""

from __future__ import annotations

import logging
import re

__all__ = ["GRPC_AIO_LOGGER", "EndedCallFilter", "install"]

GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_FAILED_BATCH = re.compile(r"ExecuteBatchError raised in core by servicer method \[(?P<method>[^\]]*)\]$")
# What core's completion callback reports for an operation that failed on the call; a batch core
# refused to start (a misuse, "Failed grpc_call_start_batch: ...") is not this and stays an ERROR.
_FAILED_ON_CALL = 'Failed "execute_batch"'


def _ended_call_method(record: logging.LogRecord) -> str | None:
    """The method of a record about a batch that core failed on an ended call, else None."""
    if record.levelno < logging.ERROR or not record.exc_info:
        return None
    error = record.exc_info[1]
    if type(error).__name__ != "ExecuteBatchError" or not str(error).startswith(_FAILED_ON_CALL):
        return None
    found = _FAILED_BATCH.match(record.getMessage())
    return None if found is None else found.group("method")


class EndedCallFilter(logging.Filter):
    """On gRPC's aio logger: a reply or status that core could not send because the call had
    ended becomes a DEBUG line without a traceback (dropped unless the logger logs DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        method = _ended_call_method(record)
        if method is None:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.msg = (
            "reply or status not sent: the call had ended (cancelled, deadline passed, client gone) [%s]"
        )
        record.args = (method,)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def install() -> None:
    """Adds EndedCallFilter to gRPC's aio logger (once)."""
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(each, EndedCallFilter) for each in logger.filters):
        logger.addFilter(EndedCallFilter())
