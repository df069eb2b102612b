"""`embedserve serve`'s options: one declaration per ServerConfig field, from which come the parser,
its environment variables, the checks and docs/configuration.md."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from embedserve.server import ServerConfig, parse_server_config
from embedserve.server.cli import build_parser, main
from embedserve.server.config import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DIM,
    DEFAULT_VOCAB_SIZE,
    ConfigError,
    ServeFlag,
    add_server_arguments,
    serve_flags,
)
from embedserve.server.config_docs import COMMAND, render
from embedserve.server.core.embedding import resolve_device

CONFIGURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
FLAGS = serve_flags()
RANGED = [flag for flag in FLAGS if flag.declared.minimum is not None or flag.declared.maximum is not None]
CHOOSING = [flag for flag in FLAGS if flag.choices]


SAMPLES_OF_CHECKED_FLAGS = {"memory_budget": ("4GiB", "4GiB"), "cache_size": ("2GiB", "2GiB")}


def _sample(flag: ServeFlag) -> tuple[str, object]:
    """A variable's text that this flag accepts, and the value it means (never the default)."""
    if flag.kind is bool:
        return "1", True
    if flag.kind is tuple:
        return "k1,k2", ("k1", "k2")
    if flag.choices:
        choice = next(c for c in flag.choices if c != flag.default)
        choice = choice.replace(":N", ":1")
        return choice, choice
    if flag.declared.check is not None:  # a text of a form of its own
        return SAMPLES_OF_CHECKED_FLAGS[flag.name]
    by_kind: dict[type, tuple[str, object]] = {
        Path: ("/some/where", Path("/some/where")),
        int: ("17", 17),
        float: ("2.5", 2.5),
        str: ("custom", "custom"),
    }
    return by_kind[flag.kind]


def _refused(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """The parser's error message; it must exit 2 as argparse does."""
    with pytest.raises(SystemExit) as exited:
        parse_server_config(argv, environ)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_each_field_is_declared_once_and_reaches_the_parser_and_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = [field.name for field in fields(ServerConfig)]
    assert [flag.name for flag in FLAGS] == names
    assert all(len(field.metadata) == 1 for field in fields(ServerConfig)), "one declaration per field"
    assert len({flag.flag for flag in FLAGS}) == len({flag.variable for flag in FLAGS}) == len(names)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, {})
    assert list(vars(parser.parse_args([]))) == names
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    served_help = " ".join(capsys.readouterr().out.split())
    rows = [line for line in render().splitlines() if line.startswith("| `--")]
    assert len(rows) == len(names)
    for flag, row in zip(FLAGS, rows, strict=True):
        assert flag.flag in served_help, flag.name
        assert flag.variable in served_help, flag.name
        assert row.startswith(f"| `{flag.flag}"), flag.name
        assert f"`{flag.variable}`" in row, flag.name
        assert flag.declared.help in row, flag.name


def test_the_committed_configuration_doc_is_the_generators() -> None:
    assert CONFIGURATION_DOC.read_text(encoding="utf-8") == render(), f"regenerate it: {COMMAND}"
    assert COMMAND in render().splitlines()[2]


def test_each_field_reads_its_variable_and_its_flag() -> None:
    defaults = ServerConfig()
    for flag in FLAGS:
        text, expected = _sample(flag)
        assert expected != getattr(defaults, flag.name), flag.name
        assert getattr(parse_server_config([], {flag.variable: text}), flag.name) == expected, flag.name
        argv = [flag.flag] if flag.kind is bool else [flag.flag, text]
        if flag.kind is tuple:
            argv = [flag.flag, "k1", flag.flag, "k2"]
        assert getattr(parse_server_config(argv, {}), flag.name) == expected, flag.name


def test_the_declared_defaults_are_valid_and_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSERVE_PORT", "not read at import or construction")
    ServerConfig().validate()
    assert ServerConfig().port == 50051
    assert parse_server_config([], {}) == ServerConfig()


def test_todays_values_are_still_accepted() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert parse_server_config(["--device", device], {}).device == device
    for dtype in ("float32", "float16", "bfloat16"):
        assert parse_server_config(["--dtype", dtype], {}).dtype == dtype
    for prefilter in ("auto", "on", "off"):
        config = parse_server_config([], {"EMBEDSERVE_WORD_VECTOR_PREFILTER": prefilter})
        assert config.word_vector_prefilter == prefilter
    for level, parsed in (("debug", "DEBUG"), ("Warning", "WARNING"), ("ERROR", "ERROR")):
        assert parse_server_config(["--log-level", level], {}).log_level == parsed
    assert parse_server_config(
        ["--max-batch-tokens", "0", "--max-wait-us", "0", "--port", "0"], {}
    ) == replace(ServerConfig(), max_batch_tokens=0, max_wait_us=0, port=0)
    assert parse_server_config([], {"EMBEDSERVE_WEIGHTS": "", "EMBEDSERVE_DIM": ""}) == ServerConfig()


@pytest.mark.parametrize("flag", RANGED + CHOOSING, ids=lambda flag: flag.flag)
def test_a_value_outside_an_option_is_refused_when_parsed_naming_flag_and_variable(
    flag: ServeFlag, capsys: pytest.CaptureFixture[str]
) -> None:
    low, high = flag.declared.minimum, flag.declared.maximum
    bad = [str(low - 1)] if low is not None else []
    bad += [str(high + 1)] if high is not None else []
    bad += ["not-a-choice"] if flag.choices else []
    bad += ["x"] if flag.kind in (int, float) else []
    for text in bad:
        assert f"argument {flag.flag}: " in _refused([flag.flag, text], {}, capsys), text
        message = _refused([], {flag.variable: text}, capsys)
        assert f"argument {flag.flag}: " in message, text
        assert f"(from {flag.variable})" in message, text
        if text != "x":  # a config built in Python can hold the same value, and is refused as clearly
            value: Any = flag.kind(text)
            with pytest.raises(ConfigError, match=f"^{re.escape(flag.flag)} must be"):
                replace(ServerConfig(), **{flag.name: value}).validate()


def test_the_messages_say_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--max-batch-size: must be positive, got 0" in _refused(["--max-batch-size", "0"], {}, capsys)
    assert "--port: must be in [0, 65535], got 65536" in _refused(["--port", "65536"], {}, capsys)
    assert "--max-wait-us: must be >= 0, got -1" in _refused(["--max-wait-us", "-1"], {}, capsys)
    assert "--dtype: must be one of float32, float16, bfloat16, got 'float64'" in _refused(
        ["--dtype", "float64"], {}, capsys
    )
    assert "--device: must be one of auto, cpu, cuda, cuda:N, got 'gpu'" in _refused(
        [], {"EMBEDSERVE_DEVICE": "gpu"}, capsys
    )
    assert "--grace: not a number: 'soon' (from EMBEDSERVE_GRACE)" in _refused(
        [], {"EMBEDSERVE_GRACE": "soon"}, capsys
    )


def test_a_config_built_in_python_is_checked_before_anything_loads() -> None:
    from embedserve.server.app import load_components
    from embedserve.server.core import StartupError

    not_a_dtype: Any = "float64"
    with pytest.raises(ConfigError, match="--max-topn must be positive, got 0"):
        ServerConfig(max_topn=0).validate()
    with pytest.raises(
        StartupError, match="--dtype must be one of float32, float16, bfloat16, got 'float64'"
    ):
        load_components(ServerConfig(device="cpu", dtype=not_a_dtype))
    not_a_prefilter: Any = "sometimes"
    with pytest.raises(StartupError, match="--word-vector-prefilter must be one of auto, on, off"):
        load_components(ServerConfig(device="cpu", word_vector_prefilter=not_a_prefilter))
    with pytest.raises(ConfigError, match="--health-port 7000 is already --port or --metrics-port"):
        ServerConfig(metrics_port=7000, health_port=7000).validate()


def test_a_flag_given_wins_over_a_bad_variable_and_other_commands_ignore_serves() -> None:
    assert parse_server_config(["--max-queue", "5"], {"EMBEDSERVE_MAX_QUEUE": "0"}).max_queue == 5
    assert build_parser({"EMBEDSERVE_MAX_QUEUE": "0"}).parse_args(["info"]).command == "info"


def test_api_keys_from_the_variable_and_the_flag_add_up_and_stay_out_of_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    environ = {"EMBEDSERVE_API_KEYS": " k1, ,k2 ", "EMBEDSERVE_INSECURE": "yes"}
    config = parse_server_config(["--api-key", "k3"], environ)
    assert (config.api_keys, config.insecure) == (("k1", "k2", "k3"), True)
    assert not parse_server_config([], {"EMBEDSERVE_INSECURE": "0"}).insecure
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "k1" not in capsys.readouterr().out


# ServerConfig from EMBEDSERVE_* variables, its defaults, and settings refused before anything serves.


def test_every_flag_reads_its_environment_variable() -> None:
    environ = {
        "EMBEDSERVE_HOST": "0.0.0.0",
        "EMBEDSERVE_PORT": "6000",
        "EMBEDSERVE_VOCAB_SIZE": "6",
        "EMBEDSERVE_DIM": "3",
        "EMBEDSERVE_CONTEXT_LENGTH": "8",
        "EMBEDSERVE_SEED": "7",
        "EMBEDSERVE_DEVICE": "cpu",
        "EMBEDSERVE_WEIGHTS": "/w.safetensors",
        "EMBEDSERVE_TOKEN_EMBEDDING_KEY": "a",
        "EMBEDSERVE_POSITION_EMBEDDING_KEY": "b",
        "EMBEDSERVE_DATA_DIR": "/data",
        "EMBEDSERVE_BPE_DIR": "/bpe",
        "EMBEDSERVE_MAX_MESSAGE_BYTES": "1000",
        "EMBEDSERVE_MAX_TOKENS_PER_REQUEST": "10",
        "EMBEDSERVE_MAX_TEXTS_PER_REQUEST": "11",
        "EMBEDSERVE_MAX_BATCH_SIZE": "12",
        "EMBEDSERVE_WORD_VECTORS": "none",
        "EMBEDSERVE_CACHE_DIR": "/cache",
        "EMBEDSERVE_MAX_TOPN": "13",
        "EMBEDSERVE_WORD_VECTOR_PREFILTER": "off",
        "EMBEDSERVE_MAX_QUERIES_PER_REQUEST": "14",
        "EMBEDSERVE_LOG_LEVEL": "DEBUG",
    }
    config = parse_server_config([], environ)
    assert config == ServerConfig(
        host="0.0.0.0",
        port=6000,
        vocab_size=6,
        dim=3,
        context_length=8,
        seed=7,
        device="cpu",
        weights=Path("/w.safetensors"),
        token_embedding_key="a",
        position_embedding_key="b",
        data_dir="/data",
        bpe_dir=Path("/bpe"),
        max_message_bytes=1000,
        max_tokens_per_request=10,
        max_texts_per_request=11,
        max_batch_size=12,
        word_vectors="none",
        cache_dir=Path("/cache"),
        max_topn=13,
        word_vector_prefilter="off",
        max_queries_per_request=14,
        log_level="DEBUG",
    )
    assert parse_server_config(["--port", "7000"], environ).port == 7000
    assert parse_server_config([], {}) == ServerConfig()


def test_the_defaults_are_the_issues() -> None:
    config = parse_server_config([], {})
    assert config.address == "127.0.0.1:50051"
    assert (config.seed, config.device, config.dtype) == (123, "auto", "float32")
    assert (DEFAULT_VOCAB_SIZE, DEFAULT_DIM, DEFAULT_CONTEXT_LENGTH) == (50257, 256, 1024)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_nonsense_limits_and_environment_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedserve.server.app import load_components
    from embedserve.server.core import StartupError

    with pytest.raises(StartupError, match="--max-batch-size must be positive"):
        load_components(ServerConfig(max_batch_size=0, device="cpu"))
    monkeypatch.setenv("EMBEDSERVE_TIMEOUT", "abc")
    with pytest.raises(SystemExit) as exited:
        main(["info"])
    assert exited.value.code == 2
