"""Corpus names never reach outside --data-dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from embedserve.server.core import CorpusStore, InvalidInput, NotFound, load_gpt2_tokenizer


@pytest.fixture
def store(tmp_path: Path) -> CorpusStore:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Hello <|endoftext|> world")
    (root / "sub" / "b.txt").write_text("nested")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    os.symlink(tmp_path, root / "escape_dir")
    os.symlink(root / "a.txt", root / "alias.txt")
    os.symlink(root / "loop.txt", root / "loop.txt")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return CorpusStore(root, load_gpt2_tokenizer(None, {}))


def test_names_resolve_inside_the_folder(store: CorpusStore) -> None:
    assert store.tokens("a.txt").tolist() == [15496, 220, 50256, 995]
    assert store.tokens("sub/b.txt").tolist() == store.tokens("./sub/b.txt").tolist()
    assert store.tokens("alias.txt").tolist() == store.tokens("a.txt").tolist()


@pytest.mark.parametrize(
    "name", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd", "", "a\0b", "..\\secret.txt"]
)
def test_names_that_leave_the_folder_are_invalid(store: CorpusStore, name: str) -> None:
    with pytest.raises(InvalidInput):
        store.resolve(name)


@pytest.mark.parametrize(
    "name", ["escape.txt", "escape_dir/secret.txt", "missing.txt", "sub", "a.txt/x", "x" * 5000, "loop.txt"]
)
def test_symlinks_out_and_missing_files_are_not_found(store: CorpusStore, name: str) -> None:
    with pytest.raises(NotFound):
        store.tokens(name)


def test_non_utf8_is_invalid_and_no_data_dir_is_not_found(store: CorpusStore) -> None:
    with pytest.raises(InvalidInput, match="not UTF-8"):
        store.tokens("latin1.txt")
    with pytest.raises(NotFound, match="no --data-dir"):
        CorpusStore(None, load_gpt2_tokenizer(None, {})).tokens("a.txt")


def test_changed_files_are_tokenized_again(store: CorpusStore) -> None:
    assert store.data_dir is not None
    first = store.tokens("sub/b.txt")
    path = store.data_dir / "sub" / "b.txt"
    path.write_text("nested and longer now")
    assert store.tokens("sub/b.txt").tolist() != first.tolist()


def test_a_prepared_corpus_never_reads_a_token_file_outside_the_folder(tmp_path: Path) -> None:
    from embedserve.server.core.prepared import prepare_corpus

    tokenizer = load_gpt2_tokenizer(None, {})
    root = tmp_path / "data"
    (tmp_path / "in.txt").write_text("Hello world, twice over.")
    prepare_corpus([tmp_path / "in.txt"], "books", root, tokenizer, threads=1)
    store = CorpusStore(root, tokenizer)
    genuine = store.tokens("books").tolist()

    # The same bytes outside the folder, reached by a symlink in place of the shard file.
    manifest = json.loads((root / "books.json").read_text())
    shard = root / manifest["shards"][0]["file"]
    outside = tmp_path / "outside.tokens"
    os.replace(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(NotFound, match="shard"):
        store.tokens("books")

    # A manifest that names a path outside the folder.
    for shard_file in ["../outside.tokens", str(outside), "", "sub/../../outside.tokens"]:
        entry = {**manifest["shards"][0], "file": shard_file}
        (root / "books.json").write_text(json.dumps({**manifest, "shards": [entry]}))
        with pytest.raises((NotFound, InvalidInput), match="shard"):
            store.tokens("books")

    # A symlink that stays inside the folder is followed.
    shard.unlink()
    os.replace(outside, root / "real.tokens")
    os.symlink(root / "real.tokens", shard)
    (root / "books.json").write_text(json.dumps(manifest))
    assert store.tokens("books").tolist() == genuine
