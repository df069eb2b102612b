"""Server configuration: one frozen dataclass, built from flags that default from EMBEDSERVE_* variables."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_VOCAB_SIZE = 50257
DEFAULT_DIM = 256
DEFAULT_CONTEXT_LENGTH = 1024
MIB = 1024 * 1024


# The folder prometheus-client's multiprocess mode keeps `--workers` metrics in; it must be set
# before prometheus_client is imported, so cli.py sets it without importing metrics.py.
PROMETHEUS_MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # None: the weights file's size, else the default above.
    vocab_size: int | None = None
    dim: int | None = None
    context_length: int | None = None
    seed: int = 123
    device: str = "auto"
    dtype: str = "float32"
    weights: Path | None = None
    token_embedding_key: str | None = None
    position_embedding_key: str | None = None
    data_dir: Path | None = None
    bpe_dir: Path | None = None
    max_message_bytes: int = 128 * MIB
    max_tokens_per_request: int = 1 << 20
    max_texts_per_request: int = 4096
    max_batch_size: int = 4096
    max_batch_tokens: int = 65536
    max_wait_us: int = 200
    max_queue: int = 1 << 22
    stream_window: int = 8
    word_vectors: str = "glove-6b-50d"
    cache_dir: Path | None = None
    max_topn: int = 10000
    word_vector_prefilter: str = "auto"
    max_queries_per_request: int = 4096
    max_terms_per_request: int = 65536
    max_results_per_request: int = 1 << 20
    log_level: str = "INFO"
    grace: float = 5.0
    # Never shown: a config printed in a log must not leak them.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    metrics_port: int = 0
    health_port: int = 0
    workers: int = 1
    max_connection_age: float = 0.0

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _optional_int(value: str) -> int | None:
    return int(value) if value else None


def _optional_str(value: str) -> str | None:
    return value or None


# flag name -> (type parser, help). Defaults come from ServerConfig.
_FLAGS: Mapping[str, tuple[Callable[[str], Any], str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "port to listen on (0 picks a free one)"),
    "vocab_size": (
        _optional_int,
        f"token embedding rows (default {DEFAULT_VOCAB_SIZE}, or the weights file's)",
    ),
    "dim": (_optional_int, f"embedding width (default {DEFAULT_DIM}, or the weights file's)"),
    "context_length": (
        _optional_int,
        f"positional embedding rows (default {DEFAULT_CONTEXT_LENGTH}, or the weights file's)",
    ),
    "seed": (int, "torch.manual_seed before the tables are initialised (without --weights)"),
    "device": (str, "torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N"),
    "dtype": (str, "storage dtype of the embedding tables: float32, float16 or bfloat16"),
    "weights": (_optional_path, "safetensors or torch state-dict file holding the two tables"),
    "token_embedding_key": (
        _optional_str,
        "key of the token table in --weights (default: wte.weight, transformer.wte.weight or tok_emb.weight)",
    ),
    "position_embedding_key": (
        _optional_str,
        "key of the positional table in --weights "
        "(default: wpe.weight, transformer.wpe.weight or pos_emb.weight)",
    ),
    "data_dir": (_optional_path, "folder whose files StreamBatches serves as corpora by name"),
    "bpe_dir": (_optional_path, "folder holding GPT-2's vocab.bpe and encoder.json (offline tokenizer)"),
    "max_message_bytes": (int, "largest gRPC message sent or received"),
    "max_tokens_per_request": (
        int,
        "most token IDs in one Embed call, EmbedStream window or Detokenize call",
    ),
    "max_texts_per_request": (int, "most texts in one Tokenize or Detokenize call"),
    "max_batch_size": (int, "largest StreamBatches batch_size"),
    "max_batch_tokens": (
        int,
        "token budget of one merged Embed lookup; concurrent requests share it (0: no merging)",
    ),
    "max_wait_us": (
        int,
        "microseconds a partial batch (under 1,024 tokens) may wait for more while requests keep "
        "arriving (idle: no wait)",
    ),
    "max_queue": (int, "most tokens waiting for the device; past it Embed is RESOURCE_EXHAUSTED"),
    "stream_window": (int, "EmbedStream windows in flight per stream (backpressure beyond it)"),
    "word_vectors": (
        str,
        "glove-6b-50d (offline default), a gensim-data name, a vectors file (word2vec .bin/.txt, GloVe .txt, "
        "fastText .vec, gensim .kv), or none",
    ),
    "cache_dir": (_optional_path, "where converted word vectors are kept (default: ~/.cache/embedserve)"),
    "max_topn": (int, "largest topn of a MostSimilar query"),
    "word_vector_prefilter": (
        str,
        "auto, on or off: scan 3CosAdd queries in bfloat16 first and score in float32 only what may rank "
        "(same answers; auto: on CPUs with native bfloat16)",
    ),
    "max_queries_per_request": (int, "most queries, pairs or words in one WordVectors call"),
    "max_terms_per_request": (int, "most positive and negative terms of all queries in one MostSimilar call"),
    "max_results_per_request": (
        int,
        "most ranked results of one MostSimilar call: the sum over its queries of topn "
        "(capped by the vocabulary each may rank)",
    ),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
    "grace": (float, "seconds that in-flight calls get to finish after SIGTERM or SIGINT"),
    "api_keys": (str, "accept calls with 'authorization: Bearer KEY' (repeatable; health checks are exempt)"),
    "tls_cert": (_optional_path, "PEM certificate chain: serve TLS (with --tls-key)"),
    "tls_key": (_optional_path, "PEM private key of --tls-cert"),
    "tls_client_ca": (_optional_path, "PEM CA bundle: require client certificates it signed (mutual TLS)"),
    "insecure": (str, "allow a non-loopback --host with neither TLS nor API keys"),
    "metrics_port": (int, "serve Prometheus metrics over HTTP on this port of --host (0: off)"),
    "health_port": (
        int,
        "also serve grpc.health.v1 alone, in plaintext, on this port of --host (0: off): for probes "
        "that cannot speak TLS or present a client certificate; it tells only whether each service serves",
    ),
    "max_connection_age": (
        float,
        "seconds before the server asks a client to reconnect (0: never); spreads long-lived clients "
        "over replicas behind an L4 balancer",
    ),
    "workers": (int, "server processes sharing --port through SO_REUSEPORT (one core each, past the GIL)"),
}


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_name(field_name: str) -> str:
    return "EMBEDSERVE_" + field_name.upper()


def _add_special(
    parser: argparse.ArgumentParser, name: str, environ: Mapping[str, str], help_text: str
) -> None:
    variable = env_name(name)
    if name == "api_keys":
        keys = [k.strip() for k in environ.get(variable, "").split(",") if k.strip()]
        parser.add_argument(
            "--api-key", dest="api_keys", action="append", default=keys, metavar="KEY",
            help=f"{help_text}; env {variable} (comma-separated)",
        )  # fmt: skip
    else:  # insecure
        parser.add_argument(
            "--insecure", dest="insecure", action="store_true", default=_truthy(environ.get(variable, "")),
            help=f"{help_text}; env {variable}=1",
        )  # fmt: skip


def add_server_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Adds one --flag per ServerConfig field; each defaults from EMBEDSERVE_<FLAG>."""
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        parse, help_text = _FLAGS[field.name]
        if field.name in ("api_keys", "insecure"):
            _add_special(parser, field.name, environ, help_text)
            continue
        variable = env_name(field.name)
        default = getattr(defaults, field.name)
        if variable in environ:
            try:
                default = parse(environ[variable])
            except ValueError as exc:
                parser.error(f"{variable}={environ[variable]!r}: {exc}")
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=parse,
            default=default,
            metavar=field.name.upper(),
            help=f"{help_text}{shown}; env {variable}",
        )


def config_from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    values = {field.name: getattr(namespace, field.name) for field in fields(ServerConfig)}
    values["api_keys"] = tuple(values["api_keys"])
    return ServerConfig(**values)


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="embedserve serve")
    add_server_arguments(parser, environ)
    return config_from_namespace(parser.parse_args(list(argv)))
