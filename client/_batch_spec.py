"""BatchSpec: how StreamBatches cuts a text into batches, declared once for both clients and the CLI.

    spec = BatchSpec(batch_size=8, max_length=4, stride=4, shuffle=False)
    for batch in client.stream_batches(text=raw_text, spec=spec): ...
    for batch in client.stream_batches(text=raw_text, batch_size=8, max_length=4): ...  # the same

`BatchSettings` names the same fields for `**settings` keywords, so a type checker checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

EmbeddingDtype = Literal["float32", "float16", "bfloat16"]


def _cli(help_text: str, flag: str | None = None) -> dict[str, str]:
    """A field's metadata: the help (and, where it differs from the name, the flag) the CLI shows."""
    return {"help": help_text} if flag is None else {"help": help_text, "flag": flag}


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """The settings of one stream of batches; every field has the default stream_batches uses.

    The defaults follow the notebook's create_dataloader_v1: with `shuffle`, epoch 0's order is that
    of a DataLoader whose generator is manual_seed(seed). `epochs` epochs stream one after another
    from `epoch`. With `world_size` > 1 this rank gets its share of every global batch. The server
    checks the values (an out-of-range one is INVALID_ARGUMENT), not this class.
    """

    batch_size: int = field(default=4, metadata=_cli("windows per batch"))
    max_length: int = field(default=256, metadata=_cli("tokens per window"))
    stride: int = field(default=128, metadata=_cli("tokens from one window's start to the next's"))
    shuffle: bool = field(default=True, metadata=_cli("shuffle the windows of each epoch"))
    seed: int = field(default=0, metadata=_cli("the shuffle's seed"))
    drop_last: bool = field(default=True, metadata=_cli("drop the last batch when it is short"))
    include_embeddings: bool = field(
        default=False, metadata=_cli("also receive each batch's input embeddings", "--embeddings")
    )
    embeddings_dtype: EmbeddingDtype = field(default="float32", metadata=_cli("dtype of the embeddings"))
    epoch: int = field(default=0, metadata=_cli("the first epoch to stream"))
    epochs: int = field(default=1, metadata=_cli("how many epochs to stream, one after another"))
    rank: int = field(default=0, metadata=_cli("this reader's rank among world_size readers"))
    world_size: int = field(default=1, metadata=_cli("how many readers share each global batch"))
    batches_per_message: int | None = field(
        default=None,
        metadata=_cli(
            "batches packed into one message (default: up to 256 kB of small batches without "
            "embeddings, one otherwise); batches still arrive one by one, each with its cursor"
        ),
    )

    def replace(self, **settings: typing.Unpack[BatchSettings]) -> BatchSpec:
        """This spec with the given fields changed (an unknown name is a TypeError)."""
        return dataclasses.replace(self, **settings)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (`--batch-size`, `--shuffle/--no-shuffle`, `--embeddings`, ...), with the
        field's default and help; `from_arguments` reads them back."""
        hints = typing.get_type_hints(cls)
        for spec_field in dataclasses.fields(cls):
            flag = spec_field.metadata.get("flag", "--" + spec_field.name.replace("_", "-"))
            help_text = spec_field.metadata["help"]
            kind = hints[spec_field.name]
            options: dict[str, Any] = {"dest": spec_field.name, "default": spec_field.default}
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction  # adds "(default: ...)" itself
            elif typing.get_origin(kind) is Literal:
                options["choices"] = typing.get_args(kind)
            elif kind in (int, int | None):
                options["type"] = int
            else:
                raise TypeError(f"BatchSpec.{spec_field.name}: no flag for a {kind}")
            if kind is not bool and spec_field.default is not None:
                help_text += " (default: %(default)s)"
            parser.add_argument(flag, help=help_text, **options)

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> BatchSpec:
        """The spec that the flags of `add_arguments` were given."""
        return cls(
            **{spec_field.name: getattr(arguments, spec_field.name) for spec_field in dataclasses.fields(cls)}
        )


class BatchSettings(TypedDict, total=False):
    """BatchSpec's fields as keyword arguments (`stream_batches(text=..., batch_size=8)`); a test
    holds the two to the same names and types."""

    batch_size: int
    max_length: int
    stride: int
    shuffle: bool
    seed: int
    drop_last: bool
    include_embeddings: bool
    embeddings_dtype: EmbeddingDtype
    epoch: int
    epochs: int
    rank: int
    world_size: int
    batches_per_message: int | None
