"""The gRPC front end of ``persia serve``: TorchServe's inference API, so that PERSIA's
``serve_client.py`` (a client generated from TorchServe's ``inference.proto``) runs unchanged.

Service ``org.pytorch.serve.grpc.inference.InferenceAPIsService``:

* ``Predictions(PredictionsRequest) -> PredictionResponse``: ``input["batch"]`` holds the bytes of
  :meth:`PersiaBatch.to_bytes() <persia.embedding.data.PersiaBatch.to_bytes>`; ``prediction`` is
  the model's output as TorchServe writes a handler's list, indented JSON (``"[\\n  0.1,\\n  0.7\\n]"``:
  one value per line, as PERSIA's client parses it).
* ``Ping(Empty) -> TorchServeHealthResponse``.

Refusals are gRPC status codes with a message naming the field: ``INVALID_ARGUMENT`` (no
``input["batch"]``, bytes that are not a batch, a batch the model cannot run),
``RESOURCE_EXHAUSTED`` (a message over ``max_request_bytes``, more than ``max_batch`` samples, or
more than ``max_concurrent + max_queue`` calls at once), ``NOT_FOUND`` (another ``model_name`` when
the server was given one), ``UNAUTHENTICATED`` (with ``settings.token``: a call without the
metadata ``authorization: Bearer <token>``, Ping included).

With ``settings.ssl_certfile`` / ``ssl_keyfile`` the port speaks TLS only
(``grpc.ssl_server_credentials``).

**The messages are built in code** from descriptors (:func:`file_descriptor`), not generated: the
schema is small, generated ``_pb2`` modules are tied to the protobuf release that generated them,
and a build step would add ``grpcio-tools`` to every install. ``inference.proto`` beside this module
is the readable interface; a test compiles it with ``grpc_tools.protoc`` and requires the same
descriptor, then runs a client generated from it.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message_factory

from persia.errors import BatchError, ConfigError
from persia.logger import get_default_logger
from persia.server._core import InFlight, RequestError, decode_batch, record
from persia.server._model import ServedModel
from persia.server.settings import ServerSettings

__all__ = [
    "PACKAGE",
    "SERVICE",
    "file_descriptor",
    "messages",
    "start_grpc_server",
    "format_prediction",
]

_logger = get_default_logger()

PACKAGE = "org.pytorch.serve.grpc.inference"
SERVICE = f"{PACKAGE}.InferenceAPIsService"
PROTO_NAME = "inference.proto"


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``inference.proto`` as a descriptor (names and field numbers of TorchServe's API)."""
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name=PROTO_NAME,
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/empty.proto"],
    )

    def field(msg: Any, name: str, number: int, kind: int, label: int = F.LABEL_OPTIONAL) -> Any:
        json_name = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
        return msg.field.add(name=name, number=number, type=kind, label=label, json_name=json_name)

    req = fdp.message_type.add(name="PredictionsRequest")
    field(req, "model_name", 1, F.TYPE_STRING)
    field(req, "model_version", 2, F.TYPE_STRING)
    entry = req.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_BYTES)
    inp = field(req, "input", 3, F.TYPE_MESSAGE, F.LABEL_REPEATED)
    inp.type_name = f".{PACKAGE}.PredictionsRequest.InputEntry"
    resp = fdp.message_type.add(name="PredictionResponse")
    field(resp, "prediction", 1, F.TYPE_BYTES)
    health = fdp.message_type.add(name="TorchServeHealthResponse")
    field(health, "health", 1, F.TYPE_STRING)
    service = fdp.service.add(name="InferenceAPIsService")
    service.method.add(
        name="Ping",
        input_type=".google.protobuf.Empty",
        output_type=f".{PACKAGE}.TorchServeHealthResponse",
    )
    service.method.add(
        name="Predictions",
        input_type=f".{PACKAGE}.PredictionsRequest",
        output_type=f".{PACKAGE}.PredictionResponse",
    )
    return fdp


_MESSAGES: dict[str, Any] = {}


def messages() -> dict[str, Any]:
    """The message classes, by name (``PredictionsRequest``, ``PredictionResponse``,
    ``TorchServeHealthResponse``), from a private descriptor pool (so a client's generated
    ``inference_pb2`` in the same process does not collide)."""
    if not _MESSAGES:
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)
        pool.AddSerializedFile(file_descriptor().SerializeToString())
        for name in ("PredictionsRequest", "PredictionResponse", "TorchServeHealthResponse"):
            desc = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
            _MESSAGES[name] = message_factory.GetMessageClass(desc)
    return _MESSAGES


def format_prediction(predictions: list[Any]) -> bytes:
    """A handler's list as TorchServe answers it: indented JSON, one value per line."""
    return json.dumps(predictions, indent=2).encode()


class _Servicer:
    def __init__(self, model: ServedModel, settings: ServerSettings, in_flight: InFlight) -> None:
        self.model, self.settings, self.in_flight = model, settings, in_flight
        m = messages()
        self.Request, self.Response = m["PredictionsRequest"], m["PredictionResponse"]
        self.Health = m["TorchServeHealthResponse"]

    def ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        record("grpc_ping", "OK", 0.0)
        return self.Health(health=json.dumps({"status": "Healthy"}, indent=2))

    def predictions(self, raw: bytes, context: grpc.ServicerContext) -> Any:
        start, code, samples = time.perf_counter(), "OK", None
        self.in_flight.enter()
        try:
            response, samples = self._predictions(raw)
            return response
        except RequestError as exc:
            code = {413: "RESOURCE_EXHAUSTED"}.get(exc.status, "INVALID_ARGUMENT")
            where = ".".join(str(p) for p in exc.loc)
            context.abort(getattr(grpc.StatusCode, code), f"{where}: {exc.msg}")
        except _NotFound as exc:
            code = "NOT_FOUND"
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except Exception:
            code = "INTERNAL"
            _logger.exception("persia serve: gRPC Predictions failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.in_flight.leave()
            record("grpc_predictions", code, time.perf_counter() - start, samples)

    def _predictions(self, raw: bytes) -> tuple[Any, int]:
        """The response and the number of samples predicted."""
        try:
            request = self.Request.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError
            raise RequestError(
                422, ["request"], f"not a PredictionsRequest ({exc})", "grpc"
            ) from None
        wanted = self.settings.model_name
        if wanted is not None and request.model_name != wanted:
            raise _NotFound(
                f"model_name: this server serves {wanted!r}, got {request.model_name!r}"
            )
        if "batch" not in request.input:
            raise RequestError(
                422,
                ["input['batch']"],
                f"missing: put PersiaBatch.to_bytes() under the key 'batch' (got keys "
                f"{sorted(request.input)})",
                "missing",
            )
        batch = decode_batch(request.input["batch"], self.settings.max_batch, ["input['batch']"])
        try:
            out = self.model.predict_batch(batch)
        except (BatchError, RuntimeError) as exc:
            raise RequestError(
                422, ["input['batch']"], f"the model cannot run on this batch: {exc}", "value_error"
            ) from None
        # PERSIA's handler answers reshape(output, (-1,)).tolist(); a value that is not finite
        # is written NaN / Infinity, which PERSIA's client reads back with float()
        arr = np.asarray(out)
        if arr.ndim == 0 or arr.shape[0] != batch.batch_size:
            raise ValueError(f"the model returned shape {arr.shape} for {batch.batch_size} samples")
        response = self.Response(
            prediction=format_prediction(arr.reshape(-1).astype(np.float64).tolist())
        )
        return response, batch.batch_size


class _NotFound(Exception):
    pass


class _TokenCheck(grpc.ServerInterceptor):
    """Every call must carry the metadata ``authorization: Bearer <token>`` (compared in
    constant time), else it is aborted with UNAUTHENTICATED before its message is decoded."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else bytes(value)
                scheme, _, credentials = raw.partition(b" ")
                same = hmac.compare_digest(credentials.strip(), self.token)
                return same and scheme.lower() == b"bearer"
        return False

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        if self._ok(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        endpoint = "grpc_" + str(handler_call_details.method).rsplit("/", 1)[-1].lower()

        def deny(request: bytes, context: grpc.ServicerContext) -> Any:
            record(endpoint, "UNAUTHENTICATED", 0.0)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: this server requires the metadata 'authorization: Bearer <token>'",
            )

        # raw bytes in and out: the message of a refused call is not decoded
        return grpc.unary_unary_rpc_method_handler(deny)


def start_grpc_server(
    model: ServedModel, settings: ServerSettings, in_flight: InFlight | None = None
) -> tuple[grpc.Server, int]:
    """Starts the gRPC front end on ``settings.host:settings.grpc_port``.

    Returns:
        The started server (stop it with ``server.stop(grace)``) and its port.

    Raises:
        OSError: the port cannot be bound.
    """
    servicer = _Servicer(model, settings, in_flight or InFlight())
    m = messages()
    handlers = {
        "Ping": grpc.unary_unary_rpc_method_handler(
            servicer.ping,
            request_deserializer=empty_pb2.Empty.FromString,
            response_serializer=m["TorchServeHealthResponse"].SerializeToString,
        ),
        # raw bytes in: a malformed message is refused by the servicer as INVALID_ARGUMENT
        "Predictions": grpc.unary_unary_rpc_method_handler(
            servicer.predictions,
            request_deserializer=None,
            response_serializer=m["PredictionResponse"].SerializeToString,
        ),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrent, thread_name_prefix="persia-grpc"
        ),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        interceptors=[] if settings.token is None else [_TokenCheck(settings.token)],
        maximum_concurrent_rpcs=settings.max_concurrent + settings.max_queue,
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", max(settings.max_request_bytes, 64 << 20)),
            ("grpc.so_reuseport", 0),
        ],
    )
    if settings.grpc_port is None:
        raise ConfigError("grpc_port is None: this server has no gRPC front end")
    where = f"{settings.host}:{settings.grpc_port}"
    try:
        if settings.ssl_certfile is not None and settings.ssl_keyfile is not None:
            credentials = grpc.ssl_server_credentials(
                [
                    (
                        Path(settings.ssl_keyfile).read_bytes(),
                        Path(settings.ssl_certfile).read_bytes(),
                    )
                ]
            )
            port = server.add_secure_port(where, credentials)
        else:
            port = server.add_insecure_port(where)
    except RuntimeError as exc:
        raise OSError(f"gRPC: cannot listen on {where}: {exc}") from None
    if port == 0:
        raise OSError(f"gRPC: cannot listen on {where}")
    server.start()
    return server, port
