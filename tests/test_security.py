"""API keys, TLS and mutual TLS, the exposed-address guard, reflection, and health at shutdown."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from embedserve.client import AsyncClient, EmbedServeError
from embedserve.client._async import _split_scheme
from embedserve.server import ServerConfig
from embedserve.server.app import Components, enter_shutdown
from embedserve.server.core import StartupError
from embedserve.server.security import check_exposure
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .conftest import ServerThread

TINY = ServerConfig(port=0, device="cpu", word_vectors="none", vocab_size=6, dim=3, log_level="WARNING")


async def _health(target: str, service: str = "", **channel: bytes) -> int:
    if channel:
        credentials = grpc.ssl_channel_credentials(channel["root"])
        opened = grpc.aio.secure_channel(target, credentials)
    else:
        opened = grpc.aio.insecure_channel(target)
    async with opened as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)


async def test_api_keys_guard_every_call_but_health(default_components: Components) -> None:
    config = replace(TINY, api_keys=("first-key", "second-key"))
    running = ServerThread(config, replace(default_components, config=config))
    try:
        for key in (None, "wrong", "first-key-but-longer", ""):
            async with AsyncClient(running.target, api_key=key) as client:
                with pytest.raises(EmbedServeError) as raised:
                    await client.embed([1, 2])
                assert raised.value.code is grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(EmbedServeError, match="UNAUTHENTICATED"):
                    async for _ in client.stream_batches(text="a b c d e f g h i j", max_length=2, stride=2):
                        pass
        async with AsyncClient(running.target, api_key="second-key") as client:
            assert (await client.embed([1, 2])).shape == (2, 256)
            assert (
                len(
                    [
                        b
                        async for b in client.stream_batches(
                            text="a b c d e f g h i j", max_length=2, stride=2
                        )
                    ]
                )
                > 0
            )
        assert await _health(running.target) == health_pb2.HealthCheckResponse.SERVING  # no key needed
    finally:
        running.stop()
    assert "first-key" not in repr(config)


def test_an_exposed_address_needs_protection_or_insecure() -> None:
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(StartupError, match="--insecure"):
            check_exposure(replace(TINY, host=host))
        check_exposure(replace(TINY, host=host, insecure=True))
        check_exposure(replace(TINY, host=host, api_keys=("k",)))
    for host in ("127.0.0.1", "::1", "localhost", "[::1]"):
        check_exposure(replace(TINY, host=host))
    with pytest.raises(StartupError, match="go together"):
        check_exposure(replace(TINY, tls_cert=Path("cert.pem")))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=embedserve-test-ca", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *extra, cwd=folder)  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_tls_and_mutual_tls(tmp_path: Path, default_components: Components) -> None:
    _certificates(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    tls = replace(TINY, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    running = ServerThread(tls, replace(default_components, config=tls))
    try:
        async with AsyncClient(running.target, root_certificates=ca) as client:
            assert (await client.embed([1])).shape == (1, 256)
        async with AsyncClient(f"https://{running.target}", root_certificates=ca) as client:
            assert (await client.embed([1])).shape == (1, 256)
        async with AsyncClient(f"https://{running.target}", timeout=3) as system_roots:
            with pytest.raises(EmbedServeError) as raised:  # the test CA is not among the system's
                await system_roots.embed([1])
            assert "CERTIFICATE_VERIFY_FAILED" in raised.value.details  # so TLS was spoken
        async with AsyncClient(running.target, timeout=3) as plain:  # no TLS: the handshake fails
            with pytest.raises(EmbedServeError) as raised:
                await plain.embed([1])
            assert raised.value.code is grpc.StatusCode.UNAVAILABLE
        assert await _health(running.target, root=ca) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()

    mutual = replace(tls, tls_client_ca=tmp_path / "ca.pem")
    running = ServerThread(mutual, replace(default_components, config=mutual))
    try:
        async with AsyncClient(running.target, root_certificates=ca, timeout=3) as anonymous:
            with pytest.raises(EmbedServeError) as raised:
                await anonymous.embed([1])
            assert raised.value.code is grpc.StatusCode.UNAVAILABLE
        async with AsyncClient(
            running.target,
            root_certificates=ca,
            client_certificate=(tmp_path / "client.pem").read_bytes(),
            client_key=(tmp_path / "client.key").read_bytes(),
        ) as client:
            assert (await client.embed([1])).shape == (1, 256)
    finally:
        running.stop()


async def test_reflection_lists_every_service(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "embedserve.v1.TokenizerService",
        "embedserve.v1.BatchesService",
        "embedserve.v1.EmbeddingService",
        "embedserve.v1.WordVectorsService",
        "grpc.health.v1.Health",
    } <= names


async def test_health_turns_not_serving_when_shutdown_starts(default_components: Components) -> None:
    running = ServerThread(TINY, replace(default_components, config=TINY))
    try:
        assert await _health(running.target) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(running.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(enter_shutdown(running.server), running._loop)
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(enter_shutdown(running.server), running._loop)
        )
        for service in ("", "embedserve.v1.EmbeddingService"):
            assert await _health(running.target, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop()


def test_target_schemes() -> None:
    assert _split_scheme("127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert _split_scheme("dns:///embedserve-headless:50051") == ("dns:///embedserve-headless:50051", False)
    assert _split_scheme("https://embed.example.com") == ("embed.example.com:443", True)
    assert _split_scheme("https://embed.example.com:8443/") == ("embed.example.com:8443", True)
    assert _split_scheme("https://[::1]:8443") == ("[::1]:8443", True)
    assert _split_scheme("http://localhost:50051") == ("localhost:50051", False)
    with pytest.raises(ValueError, match="no path"):
        _split_scheme("https://embed.example.com/v1")
