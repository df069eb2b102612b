"""Writes docs/configuration.md from ServerConfig's declarations:
`python -m embedserve.server.config_docs > docs/configuration.md` (a test fails when they differ)."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import ServeFlag, describe_default, serve_flags

COMMAND = "python -m embedserve.server.config_docs > docs/configuration.md"

_TYPE_NAMES = {
    str: "text",
    int: "integer",
    float: "number",
    Path: "path",
    bool: "switch",
    tuple: "text, repeatable",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(flag: ServeFlag) -> str:
    if flag.choices:
        return ", ".join(f"`{choice}`" for choice in flag.choices)
    return _TYPE_NAMES[flag.kind]


def _variable(flag: ServeFlag) -> str:
    if flag.kind is tuple:
        return f"`{flag.variable}` (comma-separated)"
    if flag.kind is bool:
        return f"`{flag.variable}` (1, true, yes or on)"
    return f"`{flag.variable}`"


def _row(flag: ServeFlag) -> str:
    name = f"`{flag.flag} {flag.metavar}`" if flag.kind is tuple else f"`{flag.flag}`"
    default = describe_default(flag, flag.default)
    if flag.default is not None and flag.default != ():
        default = f"`{default}`"
    cells = [name, _variable(flag), _type(flag), default, flag.range_text, flag.declared.help]
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def render() -> str:
    """docs/configuration.md as the declarations say it."""
    lines = [
        "# Configuration",
        "",
        f"Generated from `ServerConfig` in `server/config.py` by `{COMMAND}`; edit the declarations, not "
        "this file.",
        "",
        "Every flag of `embedserve serve` also reads its environment variable; a flag on the command line "
        "wins. Values are checked when parsed: one out of range or not among the choices stops the "
        "server with a message naming the flag (and the variable it came from). Without `--weights`, "
        "`--vocab-size 6 --dim 3 --seed 123` reproduces the notebook's small table.",
        "",
        "| flag | variable | type | default | range | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
        *(_row(flag) for flag in serve_flags()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
