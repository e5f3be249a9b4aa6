"""Log output: `text` (one human line per record) or `json` (one JSON object per line, for log
shippers), and the request id every record logged while handling a request carries.

The request id lives in a context variable set by the HTTP middleware, so domain code logs as
usual and its lines still name the request that caused them.
"""

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: The id of the request being handled in this task ("" outside requests).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")

#: An incoming `X-Request-Id` we echo: 1 to 128 characters a proxy or tracer would use.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}")


def accepted_id(incoming: str | None, generate: Callable[[], str]) -> str:
    """The caller's request id when it is sane (bounded length, plain characters), else a new one:
    a header value is echoed into responses and logs, so it must not carry anything else."""
    if incoming and _SANE_ID.fullmatch(incoming):
        return incoming
    return generate()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC, ms), level, logger, message, request_id
    (when logged during a request) and the traceback as `exc` (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Set the root logger's one stderr handler in the chosen format (replacing earlier ones)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
