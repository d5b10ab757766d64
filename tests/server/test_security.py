"""``persia serve`` with a bearer token and TLS (docs/security.md), against one real server on
127.0.0.1 with a self-signed certificate made here: without the token, or with a wrong one, HTTP
answers 401 and gRPC UNAUTHENTICATED; with it, 200 and the predictions; a client trusting the
certificate speaks https and TLS gRPC; plain http and a plain gRPC channel to those ports fail."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from server.conftest import Server, raw_test_rows

grpc = pytest.importorskip("grpc")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "s3cret-token_for.persia~serve"


def self_signed(out: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key, PEM files in ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = out / "cert.pem", out / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def secured(export, tmp_path_factory: pytest.TempPathFactory):
    """An export served with --token-file and TLS; $PERSIA_SERVE_TOKEN holds another token
    (the file wins)."""
    tmp = tmp_path_factory.mktemp("server-tls")
    cert, key = self_signed(tmp)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    server = Server(
        [str(export.dir), "--token-file", str(token_file)]
        + ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        env={"PERSIA_SERVE_TOKEN": "the-environment-token"},
    )
    yield SimpleNamespace(server=server, cert=cert)
    server.close()


def test_https_with_a_token(export, secured):
    url = secured.server.url
    assert url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(secured.cert))
    rows = raw_test_rows(export.job, 4)
    import persia.serving

    expected = persia.serving.load(export.dir).predict(rows)
    with httpx.Client(base_url=url, timeout=60, verify=verify) as client:
        # /healthz answers anyone (liveness probes); every other endpoint needs the token
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 401, path
        r = client.post("/predict", json={"rows": rows})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"][0]["loc"] == ["header", "authorization"]
        assert "missing" in r.json()["detail"][0]["msg"]
        for wrong in (f"Bearer {TOKEN}x", "Bearer the-environment-token", TOKEN, f"Basic {TOKEN}"):
            r = client.post("/predict", json={"rows": rows}, headers={"Authorization": wrong})
            assert r.status_code == 401, wrong
            assert r.json()["detail"][0]["type"] == "unauthorized"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = client.post("/predict", json={"rows": rows}, headers=auth)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["predictions"], expected, atol=1e-6, rtol=0)
        assert client.get("/readyz", headers=auth).json()["ready"] is True
        metrics = client.get("/metrics", headers=auth).text
        assert 'code="401"' in metrics and 'endpoint="rows"' in metrics
    # plain http to the TLS port: no answer
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)
    # a client that does not trust the certificate refuses the server
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=10)


def test_grpc_over_tls_with_a_token(export, secured):
    from google.protobuf import empty_pb2

    from persia.job.readers import JobReader
    from persia.server.grpc_api import SERVICE, messages

    m = messages()
    batch = next(JobReader(export.job.data).batches(export.job.data.test, 3, training=False))
    request = m["PredictionsRequest"](input={"batch": batch.to_bytes()}).SerializeToString()
    creds = grpc.ssl_channel_credentials(root_certificates=secured.cert.read_bytes())
    with grpc.secure_channel(secured.server.grpc, creds) as channel:
        ping = channel.unary_unary(
            f"/{SERVICE}/Ping",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=m["TorchServeHealthResponse"].FromString,
        )
        predictions = channel.unary_unary(f"/{SERVICE}/Predictions")
        for metadata in (None, [("authorization", f"Bearer {TOKEN}x")]):
            for call, arg in ((ping, empty_pb2.Empty()), (predictions, request)):
                with pytest.raises(grpc.RpcError) as info:
                    call(arg, metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization" in info.value.details()
        metadata = [("authorization", f"Bearer {TOKEN}")]
        assert json.loads(ping(empty_pb2.Empty(), metadata=metadata, timeout=30).health)
        answer = m["PredictionResponse"].FromString(
            predictions(request, metadata=metadata, timeout=30)
        )
        assert len(json.loads(answer.prediction)) == 3
    # a plain-text channel to the TLS port gets nothing
    with grpc.insecure_channel(secured.server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE}/Predictions")(request, metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_token_file_wins_and_an_empty_token_is_refused(tmp_path, monkeypatch):
    from persia.errors import ConfigError
    from persia.server import ServerSettings
    from persia.server.settings import read_token

    monkeypatch.delenv("PERSIA_SERVE_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("PERSIA_SERVE_TOKEN", " from-env\n")
    assert read_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(tmp_path / "t") == "from-file"
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing")
    monkeypatch.setenv("PERSIA_SERVE_TOKEN", "  ")
    with pytest.raises(ConfigError, match="PERSIA_SERVE_TOKEN: the token is empty"):
        read_token(None)
    with pytest.raises(ConfigError, match="token must be"):
        ServerSettings(token="two words")
    with pytest.raises(ConfigError, match="give both or neither"):
        ServerSettings(ssl_certfile=str(tmp_path / "t"))
    assert TOKEN not in repr(ServerSettings(token=TOKEN))
