"""Channel construction: address schemes, TLS and API-key metadata."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


def _read(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


@dataclass
class ChannelConfig:
    """`address`: host:port, grpc://host:port (plaintext) or grpcs://host:port (TLS).

    TLS is on with grpcs:// or when `tls=True` or any certificate is given; certificate arguments
    accept PEM bytes or a file path. `api_key` is sent as `authorization: Bearer <key>`."""

    address: str
    tls: bool | None = None
    root_certificates: bytes | str | None = None
    client_certificate: bytes | str | None = None  # mTLS
    client_key: bytes | str | None = None
    api_key: str | None = None
    options: tuple = ()

    def target(self) -> str:
        return self.address.split("://", 1)[1] if "://" in self.address else self.address

    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return self.address.startswith("grpcs://") or any(
            (self.root_certificates, self.client_certificate, self.client_key))

    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_certificate),
        )

    def sync_channel(self) -> grpc.Channel:
        options = _CHANNEL_OPTIONS + list(self.options)
        if self.use_tls():
            return grpc.secure_channel(self.target(), self._credentials(), options=options)
        return grpc.insecure_channel(self.target(), options=options)

    def aio_channel(self) -> grpc.aio.Channel:
        options = _CHANNEL_OPTIONS + list(self.options)
        if self.use_tls():
            return grpc.aio.secure_channel(self.target(), self._credentials(), options=options)
        return grpc.aio.insecure_channel(self.target(), options=options)
