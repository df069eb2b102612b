"""--tokenizer: an encoding from a .tiktoken file and its sidecar, or from tiktoken's cache, through
Tokenize, prepare, StreamBatches and Info; never a download; cursors and corpora stay with their
encoding."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import tiktoken
from embedserve.client import Client, FailedPreconditionError, InvalidArgumentError
from embedserve.server.cli import main
from embedserve.server.config import ServerConfig
from embedserve.server.core import StartupError, load_gpt2_tokenizer, load_tokenizer
from embedserve.server.core.tokenizer import find_gpt2_bpe_files, mergeable_ranks_from_data_gym
from embedserve.server.core.tokenizer_sources import TIKTOKEN_CACHED_FILES

from .conftest import ServerThread, start_server
from .corpus_files import prepared_tokens

TEAM_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Merges learned by hand for this text; " the" and " fox" get ranks past 65,535, so the token
# files of this vocabulary must hold more than 16 bits.
MERGES = [b"th", b"he", b"the", b" t", b" the", b"ox", b" f", b" fox", b"qu", b"ick"]
HIGH_RANKS = {b" the": 65_600, b" fox": 65_601, b"the": 65_602}
ENDOFTEXT_ID = 70_000
STORY = "the quick brown fox jumps over the lazy dog. " * 12
OTHER = "Then the fox, quick as ever, jumped over the dog again: 42 times!\n" * 5


def _team_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in MERGES:
        ranks[merge] = HIGH_RANKS.get(merge, len(ranks))
    return ranks


def _write_encoding(folder: Path, *, sidecar: str = "json", endoftext_id: int = ENDOFTEXT_ID) -> Path:
    """team-bpe.tiktoken and its sidecar in `folder`; returns the .tiktoken path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "team-bpe.tiktoken"
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in _team_ranks().items()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    specials = {"<|endoftext|>": endoftext_id}
    if sidecar == "json":
        meta = {"name": "team-bpe", "pat_str": TEAM_PAT_STR, "special_tokens": specials}
        (folder / "team-bpe.json").write_text(json.dumps(meta))
    else:
        (folder / "team-bpe.toml").write_text(
            f"name = \"team-bpe\"\npat_str = '''{TEAM_PAT_STR}'''\n"
            f'[special_tokens]\n"<|endoftext|>" = {endoftext_id}\n'
        )
    return path


def _reference(endoftext_id: int = ENDOFTEXT_ID) -> tiktoken.Encoding:
    """tiktoken's own Encoding of the same ranks, pattern and special tokens."""
    return tiktoken.Encoding(
        name="team-bpe",
        pat_str=TEAM_PAT_STR,
        mergeable_ranks=_team_ranks(),
        special_tokens={"<|endoftext|>": endoftext_id},
    )


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_encoding(tmp_path_factory.mktemp("team-encoding"))


@pytest.fixture(scope="module")
def team_data(team: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with books, prepared by `embedserve prepare --tokenizer team-bpe.tiktoken`."""
    data_dir = tmp_path_factory.mktemp("team-data")
    inputs = tmp_path_factory.mktemp("team-inputs")
    (inputs / "a.txt").write_text(STORY)
    (inputs / "b.jsonl").write_text(json.dumps({"text": OTHER}) + "\n" + json.dumps({"text": STORY}) + "\n")
    pyarrow.parquet.write_table(pyarrow.table({"text": [OTHER, None, STORY]}), inputs / "c.parquet")
    args = [
        "prepare",
        str(inputs / "a.txt"),
        str(inputs / "b.jsonl"),
        str(inputs / "c.parquet"),
        "--out",
        "books",
    ]
    assert main([*args, "--data-dir", str(data_dir), "--tokenizer", str(team), "--threads", "1"]) == 0
    return data_dir


@pytest.fixture(scope="module")
def team_server(team: Path, team_data: Path) -> Iterator[ServerThread]:
    running = start_server(
        ServerConfig(
            port=0, device="cpu", word_vectors="none", dim=8, tokenizer=str(team), data_dir=str(team_data)
        )
    )
    yield running
    running.stop()


def test_a_file_encoding_tokenizes_exactly_as_tiktoken(team: Path) -> None:
    tokenizer, reference = load_tokenizer(str(team)), _reference()
    for text in (STORY, OTHER, "", "ü€🙂 the the"):
        assert tokenizer.encode(text).tolist() == reference.encode(text)
    assert tokenizer.encode("a<|endoftext|>b", "all").tolist() == reference.encode(
        "a<|endoftext|>b", allowed_special="all"
    )
    assert max(tokenizer.encode(STORY).tolist()) > 65_535
    assert (tokenizer.name, tokenizer.n_vocab) == ("team-bpe", ENDOFTEXT_ID + 1)
    assert tokenizer.identity.startswith("team-bpe@")
    assert set(tokenizer.vocabulary_sha256) == {"team-bpe.tiktoken", "team-bpe.json"}
    toml = load_tokenizer(str(_write_encoding(team.parent.parent / "toml-encoding", sidecar="toml")))
    assert toml.encode(OTHER).tolist() == tokenizer.encode(OTHER).tolist()
    assert toml.identity != tokenizer.identity  # another sidecar file


def test_the_server_tokenizes_streams_and_reports_the_encoding(team_server: ServerThread) -> None:
    reference = _reference()
    with Client(team_server.target) as client:
        info = client.info()
        assert (info.tokenizer, info.tokenizer_vocab_size) == ("team-bpe", ENDOFTEXT_ID + 1)
        assert info.tokenizer_identity.startswith("team-bpe@")
        assert info.vocab_size == ENDOFTEXT_ID + 1  # the table follows the encoding by default
        ids = client.tokenize(OTHER)
        assert ids == reference.encode(OTHER)
        assert client.detokenize(ids) == OTHER
        batches = list(client.stream_batches(text=STORY, batch_size=2, max_length=8, stride=8, shuffle=False))
        story = reference.encode(STORY)
        starts = range(0, len(story) - 8, 8)
        inputs = [row for batch in batches for row in batch.inputs.tolist()]
        assert inputs == [story[i : i + 8] for i in starts][: len(inputs)]
        assert len(inputs) == len(starts) // 2 * 2
        # The prepared corpus: uint32 token IDs, documents joined with the encoding's <|endoftext|>,
        # from text, JSON lines and Parquet.
        other = reference.encode(OTHER)
        documents = [story, other, story, other, story]  # a.txt, b.jsonl, c.parquet (null skipped)
        joined = [token for ids in documents for token in [*ids, ENDOFTEXT_ID]][:-1]
        books = list(
            client.stream_batches(corpus="books", batch_size=4, max_length=16, stride=16, shuffle=False)
        )
        rows = [row for batch in books for row in batch.inputs.tolist()]
        assert rows == [joined[i : i + 16] for i in range(0, len(joined) - 16, 16)][: len(rows)]
        assert ENDOFTEXT_ID in {token for row in rows for token in row}


def test_the_prepared_sidecar_records_the_encoding(team_data: Path, team: Path) -> None:
    data_dir = team_data
    meta = json.loads((data_dir / "books.json").read_text())
    tokenizer = load_tokenizer(str(team))
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("team-bpe", ENDOFTEXT_ID + 1, "uint32")
    assert meta["tokenizer_identity"] == tokenizer.identity
    assert meta["tokenizer_sha256"] == tokenizer.vocabulary_sha256
    tokens = prepared_tokens(data_dir, "books")
    assert tokens.dtype == np.dtype("<u4")
    assert len(tokens) == meta["token_count"]
    assert tokens.max() == ENDOFTEXT_ID


def test_a_cursor_or_corpus_of_one_encoding_is_refused_under_another(
    team_server: ServerThread, team_data: Path, tmp_path: Path
) -> None:
    """Same name, same ranks, another <|endoftext|> ID: a text without it has the same token IDs,
    so only the encoding's identity tells the two apart."""
    shutil.copytree(team_data, tmp_path / "data")
    other = _write_encoding(tmp_path / "other", endoftext_id=ENDOFTEXT_ID + 5)
    running = start_server(
        ServerConfig(
            port=0,
            device="cpu",
            word_vectors="none",
            dim=8,
            tokenizer=str(other),
            data_dir=str(tmp_path / "data"),
        )
    )
    try:
        with Client(team_server.target) as client:
            first = next(iter(client.stream_batches(text=STORY, batch_size=2, max_length=8, stride=8)))
        with Client(running.target) as client:
            assert client.tokenize(STORY) == _reference().encode(STORY)
            with pytest.raises(FailedPreconditionError):
                list(
                    client.stream_batches(
                        text=STORY, batch_size=2, max_length=8, stride=8, cursor=first.cursor
                    )
                )
            with pytest.raises(InvalidArgumentError, match="prepared with"):
                list(client.stream_batches(corpus="books", batch_size=2, max_length=8, stride=8))
    finally:
        running.stop()


def test_a_tiktoken_encoding_loads_from_its_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r50k_base is GPT-2's ranks in tiktoken's format: it can be written offline, exactly."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(StartupError, match="never downloads"):
        load_tokenizer("r50k_base")
    url, sha256 = TIKTOKEN_CACHED_FILES["r50k_base"]
    cached = tmp_path / hashlib.sha1(url.encode()).hexdigest()
    ranks = mergeable_ranks_from_data_gym(find_gpt2_bpe_files(None, os.environ))
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in ranks.items()]
    cached.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    with pytest.raises(StartupError, match="sha256"):
        load_tokenizer("r50k_base")
    cached.write_bytes(b"\n".join(lines) + b"\n")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
    tokenizer = load_tokenizer("r50k_base")
    gpt2 = load_gpt2_tokenizer()
    assert (tokenizer.name, tokenizer.identity, tokenizer.n_vocab) == ("r50k_base", "r50k_base", 50257)
    assert tokenizer.encode(OTHER).tolist() == gpt2.encode(OTHER).tolist()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no-sidecar", "no team-bpe.json or team-bpe.toml"),
        ("no-pattern", "pat_str"),
        ("unknown-key", "unknown settings"),
        ("colliding-special", "are ranks of"),
        ("wrong-pin", "pins"),
        ("bad-line", "line 3"),
        ("wrong-n-vocab", "explicit_n_vocab"),
    ],
)
def test_a_bad_encoding_file_fails_at_startup_saying_why(tmp_path: Path, change: str, message: str) -> None:
    path = _write_encoding(tmp_path)
    sidecar = tmp_path / "team-bpe.json"
    meta = json.loads(sidecar.read_text())
    if change == "no-sidecar":
        sidecar.unlink()
    elif change == "no-pattern":
        del meta["pat_str"]
    elif change == "unknown-key":
        meta["pattern"] = TEAM_PAT_STR
    elif change == "colliding-special":
        meta["special_tokens"] = {"<|endoftext|>": 65_600}
    elif change == "wrong-pin":
        meta["sha256"] = "0" * 64
    elif change == "bad-line":
        lines = path.read_bytes().splitlines()
        path.write_bytes(b"\n".join([*lines[:2], b"not base64 at all", *lines[2:]]))
    elif change == "wrong-n-vocab":
        meta["explicit_n_vocab"] = 50_000
    if sidecar.exists():
        sidecar.write_text(json.dumps(meta))
    with pytest.raises(StartupError, match=message):
        load_tokenizer(str(path))


def test_tokenizer_specs_that_name_nothing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="name gpt2, one of tiktoken's encodings"):
        load_tokenizer("gpt-5")
    with pytest.raises(StartupError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.tiktoken"))
    with pytest.raises(StartupError, match="--bpe-dir"):
        load_tokenizer("cl100k_base", bpe_dir=tmp_path)
    assert load_tokenizer("gpt2").encode(OTHER).tolist() == load_gpt2_tokenizer().encode(OTHER).tolist()


def test_the_documented_sidecar_loads(tmp_path: Path) -> None:
    """docs/training-data.md's TOML sidecar, as written (its sha256 filled in), is the test's encoding."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training-data.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(.*?)```", doc, flags=re.DOTALL)
    path = _write_encoding(tmp_path)
    (tmp_path / "team-bpe.json").unlink()
    file_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "team-bpe.toml").write_text(textwrap.dedent(block).replace('"..."', f'"{file_sha256}"'))
    tokenizer = load_tokenizer(str(path))
    assert (tokenizer.name, tokenizer.n_vocab) == ("team-bpe", ENDOFTEXT_ID + 1)
    assert tokenizer.encode(STORY).tolist() == _reference().encode(STORY)
