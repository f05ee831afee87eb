"""JSON log lines with the request, correlation and trace ids of the work that wrote them."""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import math
import re
import sys
import time
import traceback
from json.encoder import encode_basestring_ascii as _json_string  # how _ENCODER (ensure_ascii) writes a string
from typing import Any

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
correlation_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
# A JWT anywhere (a token pasted into a message without its "Bearer " prefix).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# The password of a URL with credentials (amqp://user:secret@host, postgresql+asyncpg://user:secret@host/db).
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]+@")
# Extra fields whose value is a secret whatever it looks like.
_SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|authorization|api[_-]?key|credential|cookie)")
# Every pattern above needs one of these in the text: one search decides whether the four substitutions run, so
# that the lines of every RPC (method names, codes, ids) are not scanned four times.
_MAYBE_SECRET = re.compile(r"@|://|eyJ|(?i:bearer)")
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# Built once: json.dumps given any option builds a new encoder for every line.
_ENCODER = json.JSONEncoder(default=str)


def mask(text: str) -> str:
    """Masks e-mail addresses, bearer tokens, JWTs and URL passwords so logs never carry them whole."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _JWT.sub("[redacted-jwt]", _BEARER.sub(r"\1[redacted]", text))
    return _EMAIL.sub(r"\1***@\2", text)


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    """Whether a field named `key` holds a secret (remembered: the same few extra fields recur on every line)."""
    return _SECRET_KEY.search(key) is not None


def _mask_value(key: str, value: Any) -> Any:
    """Masks one extra field: secrets by their key, and every string inside (nested lists and dicts too)."""
    if value is None:
        return None
    if _secret_key(key):
        return "[redacted]"
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(key, v) for v in value]
    if isinstance(value, bytes):
        return "[bytes]"
    if isinstance(value, int | float | bool):
        return value
    return mask(str(value))


_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds ("2026-12-05T10:26:13.021+00:00"); the part up to the second is formatted once
    per second."""
    global _second
    whole = int(created)
    micros = round((created - whole) * 1_000_000)  # as datetime.fromtimestamp rounds, then drops the microseconds
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached = _second  # one read: another thread's formatter may replace it meanwhile
    if whole != cached[0]:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{micros // 1000:03d}+00:00"


def span_ids(span: trace.Span) -> tuple[str | None, str | None]:
    """The trace and span ids of `span` as log lines write them (None, None for an invalid span)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _trace_ids() -> tuple[str | None, str | None]:
    return span_ids(trace.get_current_span())


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = _trace_ids()
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": mask(record.getMessage()),
            "trace_id": trace_id,
            "span_id": span_id,
            "request_id": request_id_var.get(),
            "correlation_id": correlation_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = _mask_value(key, value)
        if record.exc_info:
            line["traceback"] = mask("".join(traceback.format_exception(*record.exc_info)))
        return _ENCODER.encode(line)


def _json_handlers(logger: logging.Logger) -> list[logging.StreamHandler] | None:
    """The handlers an INFO record of `logger` would reach, when every one of them is a plain StreamHandler with a
    JsonFormatter and no filter (what setup_logging installs) and nothing else could see or change the record on the
    way (the logger's filters, a logger or record class of the application's); None otherwise."""
    if (logger.filters or type(logger) is not logging.Logger
            or logging.getLogRecordFactory() is not logging.LogRecord):
        return None
    found = []
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if logging.INFO >= handler.level:
                if (type(handler) is not logging.StreamHandler or handler.filters
                        or type(handler.formatter) is not JsonFormatter):
                    return None
                found.append(handler)
        current = current.parent if current.propagate else None
    return found or None  # none: the logging module decides what a record nobody handles becomes


class RpcAccessLog:
    """The INFO line of each RPC on `logger`: message `rpc <method> <code>`, fields rpc_method, grpc_code and
    duration_ms.

    It is on the path of every call, and most of its cost was the logging module's record, its dispatch and the
    formatter's generic work, not the write. So when the line would reach only JSON handlers of Tessera's own kind
    (see `_json_handlers`: the default configuration), it is written to their streams under their locks as their
    JsonFormatter would write it, field for field, without a LogRecord: the message and the fields fixed by the
    method and code are masked and encoded once per method and code, and each call adds only the time, the trace,
    span, request and correlation ids and the duration. With any other handler or filter on the way (pytest's
    caplog, an application's own logging configuration), it is an ordinary `logger.info` call, which they all
    see."""

    _MESSAGE = "rpc %s %s"

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        # (service, level name, method, code) -> the line's text before its trace id and before its duration
        self._parts: dict[tuple[str, str, str, str], tuple[str, str]] = {}

    def info(self, method: str, code: str, duration_ms: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handlers = _json_handlers(logger)
        if handlers is None or type(duration_ms) is not float or not math.isfinite(duration_ms):
            logger.info(self._MESSAGE, method, code,
                        extra={"rpc_method": method, "grpc_code": code, "duration_ms": duration_ms})
            return
        created = time.time()
        trace_id, span_id = _trace_ids()
        request_id, correlation_id = request_id_var.get(), correlation_id_var.get()
        ids = (("null" if trace_id is None else f'"{trace_id}"') + ', "span_id": '
               + ("null" if span_id is None else f'"{span_id}"') + ', "request_id": '
               + ("null" if request_id is None else _json_string(request_id)) + ', "correlation_id": '
               + ("null" if correlation_id is None else _json_string(correlation_id)))
        stamp = _timestamp(created)
        duration = float.__repr__(duration_ms)
        level = logging.getLevelName(logging.INFO)
        for handler in handlers:
            service = handler.formatter.service  # type: ignore[union-attr]
            parts = self._parts.get((service, level, method, code))
            if parts is None:
                parts = self._static_parts(service, level, method, code)
            line = f'{{"time": "{stamp}{parts[0]}{ids}{parts[1]}{duration}}}'
            handler.acquire()
            try:
                handler.stream.write(line + handler.terminator)
                handler.flush()
            except RecursionError:
                raise
            except Exception:
                handler.handleError(logger.makeRecord(
                    logger.name, logging.INFO, "(unknown file)", 0, self._MESSAGE, (method, code), None,
                    extra={"rpc_method": method, "grpc_code": code, "duration_ms": duration_ms}))
            finally:
                handler.release()

    def _static_parts(self, service: str, level: str, method: str, code: str) -> tuple[str, str]:
        """The text JsonFormatter writes around the per-call values for this method and code (masked as it masks)."""
        encode = _ENCODER.encode
        head = (f'", "level": {encode(level)}, "service": {encode(service)}, "logger": {encode(self.logger.name)}, '
                f'"message": {encode(mask(self._MESSAGE % (method, code)))}, "trace_id": ')
        tail = (f', "rpc_method": {encode(_mask_value("rpc_method", method))}, '
                f'"grpc_code": {encode(_mask_value("grpc_code", code))}, "duration_ms": ')
        if len(self._parts) < 4096:  # the server's methods times the status codes: a few hundred at most
            self._parts[(service, level, method, code)] = (head, tail)
        return head, tail


def setup_logging(service: str, level: str = "INFO") -> None:
    """Routes every logger to one JSON handler on stderr. Safe to call more than once."""
    # The JSON line carries none of the caller's file, line, thread or process fields, so the logging module need
    # not look them up for each record (the optimisations the logging documentation lists): an access line per RPC
    # is on every request's path.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.WARNING)
