"""The HTTP application of ``persia serve`` (FastAPI).

Endpoints (the schema: ``GET /openapi.json``, browsable at ``/docs``):

* ``POST /predict``: JSON rows ``{"rows": [{"column": value, ...}, ...]}``, as
  :meth:`persia.serving.Predictor.predict` takes them; exports only (a checkpoint answers 409).
  Answer: ``{"predictions": [...]}``, one float per row.
* ``POST /predict/batch``: the bytes of :meth:`persia.embedding.data.PersiaBatch.to_bytes`
  (``application/octet-stream``); both kinds of model. Answer as above (a list per sample when the
  model returns several outputs per sample).
* ``GET /healthz``: the process answers (liveness).
* ``GET /readyz``: the model is loaded, with the last training delta applied and its age
  (``freshness``: None for a static model, an export); 503 while that age exceeds
  ``max_delta_age_s``.
* ``GET /metrics``: Prometheus text, :func:`persia.telemetry.render` (``persia serve`` turns
  collection on for the ``server`` role; with it off the body is empty).

Authentication (``settings.token``): every request but ``GET /healthz`` must send
``Authorization: Bearer <token>``, compared in constant time; otherwise 401 with the error body
below and ``WWW-Authenticate: Bearer``, before the body is read.

Limits: a body over ``max_request_bytes`` gets 413 before it is read whole; a request with more
than ``max_batch`` samples gets 413; more than ``max_concurrent + max_queue`` prediction requests
at once get 503 with ``Retry-After``. Every refusal is a 4xx (or that 503) with FastAPI's error
body ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` naming the field; an unexpected
failure is logged and answered 500, and the server goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import anyio
import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from persia import telemetry
from persia.errors import BatchError
from persia.logger import get_default_logger
from persia.server._coalesce import Coalescer
from persia.server._core import (
    InFlight,
    RequestError,
    as_predictions,
    decode_batch,
    record,
    record_freshness,
)
from persia.server._model import RowsNotSupported, ServedModel
from persia.server.settings import ServerSettings

__all__ = ["create_app", "RowsRequest", "Predictions", "parse_rows", "rows_table"]

_logger = get_default_logger()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: One value of a raw row: text, a number, a boolean, null (missing) or a list (multi-valued).
Value = (
    StrictStr
    | StrictInt
    | StrictFloat
    | StrictBool
    | None
    | list[StrictStr | StrictInt | StrictFloat]
)

ROWS_PATH, BATCH_PATH = "/predict", "/predict/batch"
#: JSON-rows bodies up to this size are parsed on the event loop (no thread hop)
_INLINE_PARSE_BYTES = 32 << 10
_ENDPOINTS = {
    ROWS_PATH: "rows",
    BATCH_PATH: "batch",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
}
#: the scope key a prediction handler sets to the number of samples it answered
SAMPLES_KEY = "persia.samples"


class RowsRequest(BaseModel):
    """Raw request rows, as the training files hold them (the label column is not needed).

    The schema of ``POST /predict`` (the server checks bodies with :func:`parse_rows` and
    :func:`rows_table`, to the same rules, plus one: a column's values are of one JSON type
    across rows, numbers mixing ints and floats)."""

    model_config = ConfigDict(extra="forbid")
    rows: list[dict[str, Value]] = Field(
        description="One object per sample: column name -> value (text, number, null, or a list "
        "for a multi-valued column). Every column the model reads must be present."
    )


class Predictions(BaseModel):
    """The predictions, in request order."""

    predictions: list[float | None] | list[list[float | None]]


class Readiness(BaseModel):
    """Whether the server serves, and how fresh its rows are."""

    ready: bool
    kind: Literal["export", "checkpoint"]
    reason: str | None
    freshness: dict[str, Any] | None = Field(
        description="persia.serving.ServedModel.freshness(): the generation served, the last "
        "delta applied, when it was flushed and its age; null for a static model (an export)"
    )


class _ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every refusal: where in the request, and why."""

    detail: list[_ErrorItem]


def _error_response(err: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _send_error(send: Send, err: RequestError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """ASGI middleware: body size (413 before the body is read whole), admission of prediction
    requests (503 over ``max_concurrent + max_queue``) and what is recorded in
    :mod:`persia.telemetry` (every answer by status; latency and samples of a prediction)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, in_flight: InFlight) -> None:
        self.app, self.settings, self.in_flight = app, settings, in_flight
        self.admit = settings.max_concurrent + settings.max_queue
        self.token = None if settings.token is None else settings.token.encode()

    def _unauthorized(self, scope: Scope) -> RequestError | None:
        """None when the request may pass: no token configured, ``/healthz``, or
        ``Authorization: Bearer <token>`` (compared in constant time); else the 401."""
        if self.token is None or scope["path"] == "/healthz":
            return None
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if given is None:
            msg = "missing: this server requires Authorization: Bearer <token>"
        else:
            scheme, _, credentials = given.partition(b" ")
            ok = hmac.compare_digest(credentials.strip(), self.token)
            if ok and scheme.lower() == b"bearer":
                return None
            msg = "wrong token (expected Authorization: Bearer <token>)"
        return RequestError(401, ["header", "authorization"], msg, "unauthorized")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _ENDPOINTS.get(scope["path"], "other")
        start = time.perf_counter()
        status = {"code": "none"}

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        try:
            refused = self._unauthorized(scope)
            if refused is not None:
                await _send_error(counted_send, refused, {"WWW-Authenticate": "Bearer"})
                return
            await self._handle(scope, receive, counted_send, endpoint)
        finally:
            samples = scope.get(SAMPLES_KEY) if status["code"] == "200" else None
            record(endpoint, status["code"], time.perf_counter() - start, samples)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        limit = self.settings.max_request_bytes
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
        if length is not None:
            if not length.isdigit():
                err = RequestError(400, ["header", "content-length"], "not a number", "header")
                await _send_error(send, err)
                return
            if int(length) > limit:
                await _send_error(send, _too_large(int(length), limit), {"Connection": "close"})
                return
        chunks, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _send_error(send, _too_large(size, limit), {"Connection": "close"})
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if endpoint not in ("rows", "batch"):
            await self.app(scope, replay, send)
            return
        before = self.in_flight.enter()
        try:
            if before >= self.admit:
                err = RequestError(
                    503,
                    [],
                    f"busy: {before} prediction requests in flight (limit "
                    f"{self.settings.max_concurrent} computing + {self.settings.max_queue} "
                    "queued)",
                    "overloaded",
                )
                await _send_error(send, err, {"Retry-After": "1"})
                return
            await self.app(scope, replay, send)
        finally:
            self.in_flight.leave()


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        413,
        ["body"],
        f"request body of {size} bytes or more exceeds the limit of {limit} bytes",
        "too_large",
    )


def parse_rows(body: bytes) -> list[dict[str, Any]]:
    """The ``rows`` of a ``/predict`` body (:class:`RowsRequest`), checked without a pydantic
    pass over every value (the column types are checked once per column, by Arrow).

    Raises:
        RequestError: 422 naming the field: not JSON, not an object, another key than ``rows``,
            ``rows`` not a list, a row not an object.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(422, ["body"], f"not JSON: {exc}", "json_invalid") from None
    if not isinstance(data, dict):
        raise RequestError(422, ["body"], 'expected an object {"rows": [...]}', "model_type")
    if "rows" not in data:
        raise RequestError(422, ["body", "rows"], "field required", "missing")
    extra = [k for k in data if k != "rows"]
    if extra:
        raise RequestError(
            422, ["body", extra[0]], "extra inputs are not permitted", "extra_forbidden"
        )
    rows = data["rows"]
    if not isinstance(rows, list):
        raise RequestError(422, ["body", "rows"], "expected a list of objects", "list_type")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(422, ["body", "rows", i], "expected an object", "dict_type")
    return rows


def _scalar_ok(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_int64(t)
        or pa.types.is_uint64(t)
        or pa.types.is_float64(t)
    )


def _column(name: str, values: list[Any]) -> pa.Array:
    """One request column as Arrow; 422 naming it when its values are not one JSON type
    (numbers may mix ints and floats) or not text, numbers, booleans, nulls or flat lists."""
    problem = None
    try:
        try:
            arr = pa.array(values)
        except OverflowError:  # ints past int64: unsigned 64-bit IDs
            arr = pa.array(values, type=pa.uint64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        problem = f"the values must be of one type across rows ({exc})"
    else:
        t = arr.type
        if pa.types.is_list(t):
            if not _scalar_ok(t.value_type):
                problem = f"a list must hold text or numbers of one type, got {t.value_type}"
        elif not (_scalar_ok(t) or pa.types.is_boolean(t)):
            problem = f"values must be text, numbers, booleans, null or lists, got {t}"
    if problem is not None:
        raise RequestError(
            422, ["body", "rows", "*", name], f"column {name!r}: {problem}", "value_error"
        )
    return arr


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as columns (every key of any row; a row without it gives null there).

    Raises:
        RequestError: 422 naming the column whose values cannot be one column.
    """
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            names.setdefault(key, None)
    if not names:
        raise RequestError(
            422, ["body", "rows"], "the rows have no columns (each row names its values)", "missing"
        )
    return pa.table({name: _column(name, [row.get(name) for row in rows]) for name in names})


def create_app(model: ServedModel, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``model`` (see the module docstring).

    The caller owns ``model`` (closes it after the server stops). ``app.state.in_flight`` counts
    the prediction requests admitted (shared with a gRPC front end on the same model). What is
    served at ``/metrics`` is :mod:`persia.telemetry`'s: turn it on with
    ``persia.telemetry.configure("server")`` (``persia serve`` does).
    """
    settings = settings or ServerSettings()
    in_flight = InFlight()
    limiter = anyio.CapacityLimiter(settings.max_concurrent)
    refused: dict[int | str, dict[str, Any]] = {
        "413": {"model": ErrorBody, "description": "request body or batch too large"},
        "422": {"model": ErrorBody, "description": "the request is not valid (the field is named)"},
        "503": {"model": ErrorBody, "description": "too many requests at once; retry"},
    }
    app = FastAPI(
        title="persia serve",
        version="1",
        description="Predictions of a persia model: raw JSON rows (job-file exports) or "
        "PersiaBatch.to_bytes() batches (exports and PERSIA-API checkpoints).",
    )
    app.state.in_flight = in_flight
    app.state.model = model

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {
                "loc": list(e.get("loc", ())),
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("persia serve: %s %s failed", request.method, request.url.path)
        body = {
            "detail": [
                {"loc": [], "msg": f"internal error: {type(exc).__name__}", "type": "internal"}
            ]
        }
        return JSONResponse(body, status_code=500)

    def _table(body: bytes) -> pa.Table | None:
        """The request's rows as a table (None: no rows)."""
        rows = parse_rows(body)
        if len(rows) > settings.max_batch:
            raise RequestError(
                413,
                ["body", "rows"],
                f"{len(rows)} rows, more than this server's limit of {settings.max_batch}",
                "too_large",
            )
        return rows_table(rows) if rows else None

    def _predict_rows(table: pa.Table) -> np.ndarray:
        try:
            return model.predict(table)
        except RowsNotSupported as exc:
            raise RequestError(409, ["body", "rows"], str(exc), "model_kind") from None
        except BatchError as exc:
            raise RequestError(422, ["body", "rows"], str(exc), "value_error") from None

    coalescer = None
    if model.kind == "export" and settings.coalesce_rows > 0:
        coalescer = Coalescer(
            _predict_rows, max_rows=settings.coalesce_rows, workers=settings.max_concurrent
        )
    app.state.coalescer = coalescer

    def _batch(data: bytes) -> list[Any]:
        batch = decode_batch(data, settings.max_batch, ["body"])
        try:
            out = model.predict_batch(batch)
        except BatchError as exc:
            raise RequestError(422, ["body"], str(exc), "value_error") from None
        except RuntimeError as exc:  # the dense model refused the batch's features (shapes)
            raise RequestError(
                422, ["body"], f"the model cannot run on this batch: {exc}", "value_error"
            ) from None
        return as_predictions(out, batch.batch_size)

    @app.post(
        ROWS_PATH,
        response_model=Predictions,
        responses={
            **refused,
            "409": {"model": ErrorBody, "description": "the model is a checkpoint"},
        },
        summary="Predict raw JSON rows (exports)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": RowsRequest.model_json_schema()}},
            }
        },
    )
    async def predict_rows(request: Request) -> JSONResponse:
        # checked without a pydantic pass over every value; a large body off the event loop
        body = await request.body()
        if len(body) <= _INLINE_PARSE_BYTES:
            table = _table(body)
        else:
            table = await anyio.to_thread.run_sync(_table, body, limiter=limiter)
        if table is None:
            request.scope[SAMPLES_KEY] = 0
            return JSONResponse({"predictions": []})
        if coalescer is not None:
            out = await asyncio.wrap_future(coalescer.submit(table))
        else:
            out = await anyio.to_thread.run_sync(_predict_rows, table, limiter=limiter)
        preds = as_predictions(out, table.num_rows)
        request.scope[SAMPLES_KEY] = table.num_rows
        return JSONResponse({"predictions": preds})

    @app.post(
        BATCH_PATH,
        response_model=Predictions,
        responses=refused,
        summary="Predict a PersiaBatch.to_bytes() batch (exports and checkpoints)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def predict_batch(request: Request) -> JSONResponse:
        data = await request.body()
        preds = await anyio.to_thread.run_sync(_batch, data, limiter=limiter)
        request.scope[SAMPLES_KEY] = len(preds)
        return JSONResponse({"predictions": preds})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={"503": {"model": Readiness, "description": "not ready"}},
        summary="Readiness: model loaded, last delta applied and its age",
    )
    async def readyz() -> JSONResponse:
        fresh = model.freshness()
        record_freshness(fresh)
        age, reason = (None if fresh is None else fresh.get("age_s")), None
        limit = settings.max_delta_age_s
        if limit is not None and age is not None and age > limit:
            reason = f"the last delta applied is {age:.1f} s old (limit {limit} s)"
        body = {"ready": reason is None, "kind": model.kind, "reason": reason, "freshness": fresh}
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
    )
    async def metrics() -> Response:
        record_freshness(model.freshness())
        body, content_type = telemetry.render()
        return Response(body, media_type=content_type)

    app.add_middleware(_Guard, settings=settings, in_flight=in_flight)  # type: ignore[arg-type]
    return app
