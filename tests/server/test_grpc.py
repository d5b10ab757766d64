"""``persia serve``'s gRPC front end is TorchServe's inference API: a client generated from
``persia/server/inference.proto`` with ``grpc_tools.protoc`` (as PERSIA's launch_ts.sh generates
TorchServe's) and written the way PERSIA's ``serve_client.py`` is gets ``eval_ctx``'s predictions;
refusals are gRPC status codes naming the field."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the dev extra")

PROTO = Path(__file__).resolve().parents[2] / "persia" / "server" / "inference.proto"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """inference_pb2 / inference_pb2_grpc and a descriptor set, compiled from the .proto."""
    import importlib.resources

    out = tmp_path_factory.mktemp("stubs")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO.parent}",
            f"--proto_path={include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={out / 'inference.pb'}",
            PROTO.name,
        ]
    )
    assert rc == 0
    return out


def test_the_descriptors_built_in_code_are_the_proto_files(stubs):
    from google.protobuf import descriptor_pb2

    from persia.server.grpc_api import file_descriptor

    compiled = descriptor_pb2.FileDescriptorSet.FromString((stubs / "inference.pb").read_bytes())
    assert len(compiled.file) == 1
    assert compiled.file[0] == file_descriptor()
    # TorchServe's names and field numbers, as PERSIA's client uses them
    fields = {(m.name, f.name): f.number for m in compiled.file[0].message_type for f in m.field}
    assert fields[("PredictionsRequest", "model_name")] == 1
    assert fields[("PredictionsRequest", "model_version")] == 2
    assert fields[("PredictionsRequest", "input")] == 3
    assert fields[("PredictionResponse", "prediction")] == 1
    assert compiled.file[0].package == "org.pytorch.serve.grpc.inference"
    assert [m.name for m in compiled.file[0].service[0].method] == ["Ping", "Predictions"]


#: A client written the way PERSIA's examples/src/adult-income/serve_client.py is: stubs
#: generated from the .proto on sys.path, PersiaBatch.to_bytes() under "batch", and the answer
#: parsed line by line as that client parses TorchServe's.
CLIENT = """
import json, sys
sys.path.append(sys.argv[1])
import grpc
import inference_pb2
import inference_pb2_grpc

def get_inference_stub(address):
    channel = grpc.insecure_channel(address)
    return inference_pb2_grpc.InferenceAPIsServiceStub(channel)

def infer(stub, model_name, model_input):
    input_data = {"batch": model_input}
    response = stub.Predictions(
        inference_pb2.PredictionsRequest(model_name=model_name, input=input_data)
    )
    prediction = response.prediction.decode("utf-8")
    prediction = prediction.splitlines()
    prediction = [x.strip() for x in prediction]
    prediction = [x.replace(",", "") for x in prediction]
    prediction = prediction[1:-1]
    return [float(x) for x in prediction]

out = []
for path in sys.argv[3:]:
    with open(path, "rb") as f:
        out.append(infer(get_inference_stub(sys.argv[2]), "adult_income", f.read()))
print(json.dumps(out))
"""


def test_a_persia_style_client_gets_eval_ctx_predictions(
    tmp_path, stubs, checkpoint, checkpoint_server
):
    files = []
    for i, batch in enumerate(checkpoint.batches):
        files.append(tmp_path / f"batch{i}.bin")
        files[-1].write_bytes(batch.to_bytes())
    script = tmp_path / "serve_client.py"
    script.write_text(CLIENT)
    done = subprocess.run(
        [sys.executable, str(script), str(stubs), checkpoint_server.grpc, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    for predictions, expected in zip(got, checkpoint.expected, strict=True):
        assert len(predictions) == len(expected)
        np.testing.assert_allclose(predictions, expected, atol=1e-6, rtol=0)


def test_refusals_are_status_codes_naming_the_field(stubs, checkpoint, checkpoint_server):
    sys.path.insert(0, str(stubs))
    try:
        pb2 = importlib.import_module("inference_pb2")
        pb2_grpc = importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(stubs))
    from google.protobuf import empty_pb2

    with grpc.insecure_channel(checkpoint_server.grpc) as channel:
        stub = pb2_grpc.InferenceAPIsServiceStub(channel)
        health = json.loads(stub.Ping(empty_pb2.Empty(), timeout=30).health)
        assert health == {"status": "Healthy"}
        batch = checkpoint.batches[0].to_bytes()

        def call(**kw):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predictions(pb2.PredictionsRequest(**kw), timeout=30)
            return info.value

        err = call(model_name="adult_income", input={"data": batch})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input['batch']" in err.details()
        err = call(model_name="adult_income", input={"batch": b"junk"})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "PersiaBatch" in err.details()
        err = call(model_name="other", input={"batch": batch})
        assert err.code() == grpc.StatusCode.NOT_FOUND and "model_name" in err.details()
        err = call(model_name="adult_income", input={"batch": b"\0" * (17 << 20)})
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a malformed message (raw bytes on the wire) is refused too, and serving goes on
        raw = channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = stub.Predictions(
            pb2.PredictionsRequest(model_name="adult_income", input={"batch": batch}), timeout=30
        )
        values = json.loads(ok.prediction)
        np.testing.assert_allclose(values, checkpoint.expected[0], atol=1e-6, rtol=0)
