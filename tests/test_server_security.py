"""API keys (authorization: Bearer) and TLS / mTLS with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from fake_engine import FakeEngine

from longcat_service.client import NO_RETRY, LongCatClient, UnauthenticatedError, UnavailableError
from longcat_service.server.app import ServerConfig, TlsConfig
from longcat_service.server.auth import ApiKeyInterceptor
from longcat_service.server.background import BackgroundServer
from longcat_service.server.generated import longcat_pb2 as pb
from longcat_service.server.generated import longcat_pb2_grpc as pb_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def make_cert(common_name: str, issuer=None, is_ca: bool = False):
    """(cert PEM, key PEM, cert, key); self-signed when issuer is None, else signed by issuer=(cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem, cert, key


@pytest.fixture(scope="module")
def api_key_server():
    config = ServerConfig(port=0, api_keys=["key-one", "key-two"])
    with BackgroundServer(FakeEngine, config) as srv:
        yield srv


@pytest.mark.parametrize("api_key", [None, "wrong", "key-one-and-more", "Bearer key-one"])
def test_missing_or_wrong_api_key_is_unauthenticated(api_key_server, api_key):
    client = LongCatClient(api_key_server.address, api_key=api_key, retry=NO_RETRY)
    with pytest.raises(UnauthenticatedError):
        client.generate("hi", max_tokens=2)
    with pytest.raises(UnauthenticatedError):
        client.model_info()


@pytest.mark.parametrize("api_key", ["key-one", "key-two"])
def test_valid_api_keys_are_accepted(api_key_server, api_key):
    client = LongCatClient(api_key_server.address, api_key=api_key)
    assert client.generate("hi", max_tokens=2).finish_reason == "length"
    assert client.tokenize("ab") == [97, 98]


def test_health_is_open_without_a_key(api_key_server):
    assert LongCatClient(api_key_server.address).health() == "SERVING"


def test_interceptor_rejects_empty_keys():
    with pytest.raises(ValueError):
        ApiKeyInterceptor([])
    with pytest.raises(ValueError):
        ApiKeyInterceptor(["ok", ""])


@pytest.fixture(scope="module")
def pki():
    ca_pem, _, ca_cert, ca_key = make_cert("longcat-test-ca", is_ca=True)
    server_pem, server_key, _, _ = make_cert("localhost", issuer=(ca_cert, ca_key))
    client_pem, client_key, _, _ = make_cert("client", issuer=(ca_cert, ca_key))
    return dict(ca=ca_pem, server=(server_pem, server_key), client=(client_pem, client_key))


def test_tls_with_a_self_signed_certificate(tmp_path):
    cert_pem, key_pem, _, _ = make_cert("localhost")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    tls = TlsConfig.from_files(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with BackgroundServer(FakeEngine, ServerConfig(port=0, tls=tls)) as srv:
        port = srv.server.port
        secure = LongCatClient(f"grpcs://localhost:{port}", root_certificates=str(tmp_path / "cert.pem"))
        assert secure.generate("hi", max_tokens=3).finish_reason == "length"
        assert secure.health() == "SERVING"
        plaintext = LongCatClient(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=5)
        with pytest.raises(UnavailableError):
            plaintext.generate("hi", max_tokens=1)
        untrusted = LongCatClient(f"grpcs://localhost:{port}", retry=NO_RETRY, timeout=5)  # system roots only
        with pytest.raises(UnavailableError):
            untrusted.generate("hi", max_tokens=1)


def test_mutual_tls_requires_a_client_certificate(pki):
    tls = TlsConfig(cert_chain=pki["server"][0], private_key=pki["server"][1], client_ca=pki["ca"])
    with BackgroundServer(FakeEngine, ServerConfig(port=0, tls=tls)) as srv:
        address = f"grpcs://localhost:{srv.server.port}"
        with_cert = LongCatClient(address, root_certificates=pki["ca"], client_certificate=pki["client"][0],
                                  client_key=pki["client"][1])
        assert with_cert.generate("hi", max_tokens=2).finish_reason == "length"
        without_cert = LongCatClient(address, root_certificates=pki["ca"], retry=NO_RETRY, timeout=5)
        with pytest.raises(UnavailableError):
            without_cert.generate("hi", max_tokens=1)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(api_key_server, scheme):
    # RFC 6750 section 2.1 / RFC 7235 section 2.1: auth schemes are case-insensitive tokens
    with grpc.insecure_channel(api_key_server.address) as channel:
        stub = pb_grpc.LongCatStub(channel)
        reply = stub.Tokenize(pb.TokenizeRequest(text="ab"), metadata=(("authorization", f"{scheme} key-one"),),
                              timeout=10)
    assert list(reply.token_ids) == [97, 98]


@pytest.mark.parametrize("header", ["key-one", "Basic key-one", "Bearerkey-one", "Bearer", "Bearer  ", "bearer wrong"])
def test_other_authorization_values_are_refused(api_key_server, header):
    with grpc.insecure_channel(api_key_server.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.LongCatStub(channel).Tokenize(pb.TokenizeRequest(text="ab"), metadata=(("authorization", header),),
                                              timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
