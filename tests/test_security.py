"""API keys, TLS and mutual TLS, the exposed-address guard, reflection, and health at shutdown."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from embedserve.client import AsyncClient, Client, EmbedServeError
from embedserve.client._async import _split_scheme
from embedserve.server import ServerConfig
from embedserve.server.app import Components, load_components
from embedserve.server.cli import main
from embedserve.server.config import parse_server_config
from embedserve.server.core import StartupError
from embedserve.server.security import check_exposure
from embedserve.v1 import batches_pb2, embedding_pb2, tokenizer_pb2, word_vectors_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .conftest import ServerThread, free_port, make_certificates, start_cli_server

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
        check_exposure(replace(TINY, host=host, tls_cert=Path("cert.pem"), tls_key=Path("key.pem")))
    for host in ("127.0.0.1", "::1", "localhost", "[::1]"):
        check_exposure(replace(TINY, host=host))
    with pytest.raises(StartupError, match="go together"):
        check_exposure(replace(TINY, tls_cert=Path("cert.pem")))


def test_exposed_metrics_need_their_own_token_or_insecure() -> None:
    metrics = replace(TINY, metrics_port=9090)
    assert metrics.metrics_host == "127.0.0.1"
    check_exposure(metrics)  # loopback by default: no token needed
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        exposed = replace(metrics, metrics_host=host)
        with pytest.raises(StartupError) as refused:
            check_exposure(exposed)
        assert str(refused.value) == (
            f"--metrics-host {host} is reachable from other machines: give --metrics-token "
            "(EMBEDSERVE_METRICS_TOKEN), or --insecure (EMBEDSERVE_INSECURE=1) to serve the metrics "
            "unprotected anyway"
        )
        with pytest.raises(StartupError, match="--metrics-token"):  # API keys do not stand in for it
            check_exposure(replace(exposed, api_keys=("k",)))
        check_exposure(replace(exposed, metrics_token="t"))
        check_exposure(replace(exposed, insecure=True))
        check_exposure(replace(exposed, metrics_port=0))  # no listener, nothing exposed
    for host in ("127.0.0.1", "::1", "localhost", "[::1]"):
        check_exposure(replace(metrics, metrics_host=host))
    for token in ("", " t", "t\n"):
        with pytest.raises(StartupError, match="metrics token is empty or has surrounding spaces"):
            check_exposure(replace(metrics, metrics_token=token))
    config = parse_server_config(["--metrics-port", "9090"], {"EMBEDSERVE_METRICS_TOKEN": "t-never-shown"})
    assert (config.metrics_host, config.metrics_token) == ("127.0.0.1", "t-never-shown")
    assert "t-never-shown" not in repr(config)
    assert parse_server_config([], {"EMBEDSERVE_METRICS_HOST": "0.0.0.0"}).metrics_host == "0.0.0.0"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_tls_and_mutual_tls(tmp_path: Path, default_components: Components) -> None:
    make_certificates(tmp_path)
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

    mutual = replace(tls, tls_client_ca=tmp_path / "ca.pem", api_keys=("mutual-key",))
    running = ServerThread(mutual, replace(default_components, config=mutual))
    certificate, key = (tmp_path / "client.pem").read_bytes(), (tmp_path / "client.key").read_bytes()
    try:
        async with AsyncClient(running.target, root_certificates=ca, timeout=3) as anonymous:
            with pytest.raises(EmbedServeError) as raised:
                await anonymous.embed([1])
            assert raised.value.code is grpc.StatusCode.UNAVAILABLE
        async with AsyncClient(
            running.target, api_key="mutual-key", root_certificates=ca, client_certificate=certificate,
            client_key=key,
        ) as client:  # fmt: skip
            assert (await client.embed([1])).shape == (1, 256)

        def sync_tokenize() -> list[int]:
            with Client(
                running.target, api_key="mutual-key", root_certificates=ca, client_certificate=certificate,
                client_key=key,
            ) as sync_client:  # fmt: skip
                return sync_client.tokenize("hello world")

        assert await asyncio.to_thread(sync_tokenize) == [31373, 995]

        # The CLI's client commands take the same, as files (or EMBEDSERVE_* variables).
        files = ["--target", running.target, "--root-cert", str(tmp_path / "ca.pem"),
                 "--client-cert", str(tmp_path / "client.pem"),
                 "--client-key", str(tmp_path / "client.key")]  # fmt: skip
        assert await asyncio.to_thread(main, ["tokenize", "hi", *files, "--api-key", "mutual-key"]) == 0
        assert await asyncio.to_thread(main, ["tokenize", "hi", *files]) == 1  # no key: UNAUTHENTICATED
        assert await asyncio.to_thread(main, ["health", *files]) == 0  # health needs no key
        # The certificate names 127.0.0.1 and localhost; --server-name checks it for another name.
        assert await asyncio.to_thread(main, ["health", *files, "--server-name", "localhost"]) == 0
        assert await asyncio.to_thread(main, ["health", *files, "--server-name", "elsewhere.example"]) == 1
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

    # What grpcurl does next: fetch each service's file and read its methods from it.
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        for module in (tokenizer_pb2, batches_pb2, embedding_pb2, word_vectors_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.full_name)
                (reply,) = [r async for r in stub.ServerReflectionInfo(iter([request]))]
                files = [
                    descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for raw in reply.file_descriptor_response.file_descriptor_proto
                ]
                served = {
                    method.name
                    for file in files
                    for described in file.service
                    if f"{file.package}.{described.name}" == service.full_name
                    for method in described.method
                }
                assert served == set(service.methods_by_name), service.full_name

        # And call one with nothing but what reflection described, as grpcurl does.
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="embedserve.v1.TokenizerService"
        )
        (reply,) = [r async for r in stub.ServerReflectionInfo(iter([request]))]
        pool = descriptor_pool.DescriptorPool()
        pending = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        while pending:  # dependencies first, in whatever order they came
            ready = [f for f in pending if all(pool_has(pool, d) for d in f.dependency)]
            assert ready, [f.name for f in pending]
            for file in ready:
                pool.Add(file)
                pending.remove(file)
        request_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("embedserve.v1.TokenizeRequest")
        )
        reply_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("embedserve.v1.TokenizeResponse")
        )
        tokenize = channel.unary_unary(
            "/embedserve.v1.TokenizerService/Tokenize",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=reply_type.FromString,
        )
        answer = await tokenize(json_format.ParseDict({"texts": ["Hello, world"]}, request_type()))
        assert list(answer.lengths) == [3]


def pool_has(pool: descriptor_pool.DescriptorPool, name: str) -> bool:
    try:
        pool.FindFileByName(name)
    except KeyError:
        return False
    return True


async def test_health_turns_not_serving_when_shutdown_starts(default_components: Components) -> None:
    running = ServerThread(TINY, replace(default_components, config=TINY))
    try:
        assert await _health(running.target) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(running.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.wrap_future(running.enter_shutdown())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        await asyncio.wrap_future(running.enter_shutdown())
        for service in (
            "",
            *(f"embedserve.v1.{name}Service" for name in ("Tokenizer", "Batches", "Embedding")),
        ):
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


async def test_the_health_port_serves_health_alone_in_plaintext_and_keys_stay_out_of_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    health_port = free_port()
    server = start_cli_server(
        "--vocab-size", "6", "--dim", "3", "--device", "cpu", "--word-vectors", "none",
        "--api-key", "k-7f3a9c-never-logged", "--health-port", str(health_port), "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        async with AsyncClient(server.target, api_key="k-7f3a9c-never-logged") as client:
            assert await client.tokenize("hello") == [31373]
        async with AsyncClient(server.target, api_key="k-wrong-never-logged") as client:
            with pytest.raises(EmbedServeError) as raised:
                await client.tokenize("hello")
            assert raised.value.code is grpc.StatusCode.UNAUTHENTICATED
        health_target = f"127.0.0.1:{health_port}"
        assert await _health(health_target) == health_pb2.HealthCheckResponse.SERVING
        assert await _health(health_target, "embedserve.v1.EmbeddingService") == (
            health_pb2.HealthCheckResponse.SERVING
        )
        async with AsyncClient(health_target, api_key="k-7f3a9c-never-logged", timeout=5) as client:
            with pytest.raises(EmbedServeError) as raised:  # no data, even with the key
                await client.tokenize("hello")
            assert raised.value.code is grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(health_target) as channel:
            # No request message: one sent after the refusal arrived fails in the client's core
            # (INTERNAL) instead, now and then.
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [reply async for reply in listing]
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert await asyncio.to_thread(main, ["health", "--target", health_target]) == 0
        # The container's probe: target from EMBEDSERVE_HEALTH_PORT, plaintext even where the
        # environment holds client TLS settings for the main port.
        pem = tmp_path / "some.pem"
        pem.write_text("not used")
        monkeypatch.setenv("EMBEDSERVE_HEALTH_PORT", str(health_port))
        monkeypatch.setenv("EMBEDSERVE_ROOT_CERT", str(pem))
        assert await asyncio.to_thread(main, ["health"]) == 0
        # A certificate without its key is a clear error, not a crash in gRPC's core.
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["health", "--client-cert", str(pem)]) == 1
        assert "--client-cert and --client-key go together" in capsys.readouterr().err
    finally:
        assert server.terminate() == 0, server.log
    assert "DEBUG" in server.log
    assert "never-logged" not in server.log, "a key reached the log"
    clash = parse_server_config(["--port", "6000", "--health-port", "6000"], {})
    with pytest.raises(StartupError, match="health-port"):
        load_components(clash)
