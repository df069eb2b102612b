"""The conformance cases run from Node.js (tests/conformance/node/runner.js, from the protos alone).

The Node runner must agree with the Python one (tests/conformance/runner.py) case by case, in the
clear and over TLS with an API key, as docs/protocol.md's Node.js quick start connects. Without
`node` and `npm` these tests skip, unless EMBEDSERVE_REQUIRE_NODE=1; the npm packages are
installed from package-lock.json (`npm ci`) on first use.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import pytest

from .conformance import runner
from .conftest import TINY_CONFIG, VERDICT_PATH, ServerThread, make_certificates, requires_glove, start_server

NODE_DIR = Path(__file__).parent / "conformance" / "node"
RUNNER_JS = NODE_DIR / "runner.js"
SUITE = runner.load_cases()
CASES = {case["name"]: case for case in SUITE["cases"]}
TINY_CASES = {case["name"] for case in SUITE["cases"] if case["server"] == "tiny"}
VERDICT = VERDICT_PATH if VERDICT_PATH.is_file() else None
API_KEY = "node-conformance-key"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("EMBEDSERVE_REQUIRE_NODE") == "1":
        pytest.fail(f"EMBEDSERVE_REQUIRE_NODE=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with runner.js's packages installed (npm ci, once)."""
    executable = shutil.which("node")
    if executable is None:
        _unavailable("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            _unavailable(f"npm is not installed and {NODE_DIR / 'node_modules'} is absent")
        installed = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--prefer-offline"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if installed.returncode != 0:
            _unavailable(f"npm ci failed:\n{installed.stderr[-4000:]}")
    return executable


def run_node(
    node: str,
    targets: Mapping[str, str],
    *,
    api_key: str | None = None,
    tls_ca: Path | None = None,
    cases_path: Path | None = None,
) -> list[runner.CaseResult]:
    """runner.js's results, one per line it printed; fails on anything but exit status 0 or 1."""
    command = [node, str(RUNNER_JS)]
    for name, target in targets.items():
        command += ["--target", f"{name}={target}"]
    for flag, value in (("--verdict", VERDICT), ("--api-key", api_key), ("--tls-ca", tls_ca)):
        if value is not None:
            command += [flag, str(value)]
    if cases_path is not None:
        command += ["--cases", str(cases_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode in (0, 1), f"runner.js exited {done.returncode}:\n{done.stderr}"
    results = []
    for line in done.stdout.splitlines():
        parsed: dict[str, str] = json.loads(line)
        results.append(runner.CaseResult(parsed["name"], parsed["outcome"], parsed["detail"]))
    failed = any(result.outcome == "failed" for result in results)
    assert done.returncode == int(failed), done.stderr
    return results


def outcomes(results: Sequence[runner.CaseResult]) -> dict[str, str]:
    return {result.name: result.outcome for result in results}


def assert_the_runners_agree(node_results: list[runner.CaseResult], python: list[runner.CaseResult]) -> None:
    by_node, by_python = outcomes(node_results), outcomes(python)
    assert [result.name for result in node_results] == [case["name"] for case in SUITE["cases"]]
    disagree = {name: (got, by_python[name]) for name, got in by_node.items() if got != by_python[name]}
    assert not disagree, f"(node, python) outcomes differ: {disagree}\nnode: {node_results}"
    failed = [f"{result.name}: {result.detail}" for result in node_results if result.outcome == "failed"]
    assert not failed, "\n".join(failed)


@requires_glove
def test_every_case_passes_from_node(node: str, server: ServerThread, tiny_server: ServerThread) -> None:
    targets = {"default": server.target, "tiny": tiny_server.target}
    node_results = run_node(node, targets)
    assert_the_runners_agree(node_results, runner.run_cases(targets, verdict=VERDICT))
    passed = sum(result.outcome == "passed" for result in node_results)
    needs_verdict = sum("the-verdict" in case.get("requires", []) for case in SUITE["cases"])
    assert passed == len(SUITE["cases"]) - (0 if VERDICT else needs_verdict)


@pytest.fixture(scope="module")
def secured_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    """The tiny server behind TLS (a test CA) and an API key."""
    folder = tmp_path_factory.mktemp("node-tls")
    make_certificates(folder)
    config = replace(
        TINY_CONFIG, tls_cert=folder / "server.pem", tls_key=folder / "server.key", api_keys=(API_KEY,)
    )
    running = start_server(config)
    yield running, folder / "ca.pem"
    running.stop()


def test_node_over_tls_with_an_api_key(node: str, secured_tiny: tuple[ServerThread, Path]) -> None:
    server, ca = secured_tiny
    targets = {"tiny": server.target}
    node_results = run_node(node, targets, api_key=API_KEY, tls_ca=ca)
    assert_the_runners_agree(node_results, runner.run_cases(targets, api_key=API_KEY, tls_ca=ca))
    assert {name for name, outcome in outcomes(node_results).items() if outcome == "passed"} == TINY_CASES
    # The key travels: a wrong one is refused everywhere but health.
    refused = outcomes(run_node(node, targets, api_key="wrong-key", tls_ca=ca))
    guarded = {name for name in TINY_CASES if not name.startswith("health/")}
    assert {refused[name] for name in guarded} == {"failed"}


def test_the_node_runner_can_fail(node: str, tiny_server: ServerThread, tmp_path: Path) -> None:
    """Each kind of expectation, made wrong, fails; so does a request field the protos lack."""
    wrong: list[dict[str, Any]] = []
    rows = copy.deepcopy(CASES["embed/tiny-table-rows"])
    rows["expect"]["embeddings"]["$tensor"]["values"][4] += 1e-3
    bfloat16 = copy.deepcopy(CASES["embed/tiny-bfloat16"])
    bfloat16["expect"]["embeddings"]["$tensor"]["values"][0] = 0.2871
    float16 = copy.deepcopy(CASES["embed/tiny-float16"])
    float16["expect"]["embeddings"]["$tensor"]["values"][-1] *= -1
    stream = copy.deepcopy(CASES["embed-stream/in-order"])
    stream["responses"][1]["sequence_id"] = "4"
    status = copy.deepcopy(CASES["embed/missing-tensor"])
    status["status"]["message_contains"] = ["no such words"]
    ok_expected_refusal = copy.deepcopy(CASES["embed/tiny-positions"])
    ok_expected_refusal["status"] = {"code": "INVALID_ARGUMENT"}
    count = copy.deepcopy(CASES["embed-stream/in-order"])
    count["response_count"] = 3
    digest = copy.deepcopy(CASES["embed-stream/in-order"])
    digest["stream_digest"] = {"field": "embeddings", "sha256": "0" * 64}
    unknown_field = copy.deepcopy(CASES["embed/tiny-positions"])
    unknown_field["request"]["options"] = {"include_positionals": True}
    wrong += [rows, bfloat16, float16, stream, status, ok_expected_refusal, count, digest, unknown_field]
    for index, case in enumerate(wrong):
        case["name"] = f"wrong-{index}"
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"cases": wrong}))
    results = run_node(node, {"tiny": tiny_server.target}, cases_path=path)
    assert [result.outcome for result in results] == ["failed"] * len(wrong), results


QUICK_START = "## Node.js quick start"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
REPO = DOCS.parents[1]


def quick_start_snippets() -> list[str]:
    """The ```js blocks of docs/protocol.md's Node.js quick start, in order."""
    lines = DOCS.read_text().splitlines()
    start = lines.index(QUICK_START)
    snippets: list[str] = []
    block: list[str] | None = None
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if block is None and line.strip() == "```js":
            block = []
        elif block is not None and line.strip() == "```":
            snippets.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return snippets


@requires_glove
def test_the_quick_start_runs_as_written(node: str, server: ServerThread, tmp_path: Path) -> None:
    """The docs' snippets, joined in one async function as they say, against a default server."""
    snippets = quick_start_snippets()
    assert len(snippets) >= 6, "the quick start lost its snippets"
    body = "\n".join(snippets)
    assert body.count("'127.0.0.1:50051'") == 1
    body = body.replace("'127.0.0.1:50051'", json.dumps(server.target))  # the test's ephemeral port
    # What the snippets computed, printed for the checks below.
    report = (
        "console.log('REPORT ' + JSON.stringify("
        "{ tokens, shape: reply.embeddings.shape, count: vectors.length, status }));"
    )
    script = tmp_path / "quick-start.js"
    script.write_text(
        "(async () => {\n" + body + "\n" + report + "\n})().catch((error) => {\n"
        "  console.error(error);\n  process.exit(1);\n});\n"
    )
    env = {**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")}
    env.pop("EMBEDSERVE_API_KEY", None)
    done = subprocess.run([node, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    report_values = json.loads(line.removeprefix("REPORT "))
    assert report_values["tokens"] == {
        "token_ids": {"dtype": "DTYPE_INT32", "shape": ["3"], "data": "iDwAAAsAAADjAwAA"},
        "lengths": ["3"],
    }
    assert report_values["shape"] == ["1", "3", "256"]
    assert report_values["count"] == 768
    assert report_values["status"] == "SERVING"
    # The stream's one reply, and the refusal with its ErrorInfo, as the comments say.
    assert "7 [ '2', '256' ]" in done.stdout
    assert "reason: 'LIMIT_EXCEEDED'" in done.stdout, done.stdout
