"""The synchronous twins cannot drift from the async originals, nor BatchSpec from its keywords."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import inspect
import operator
import shlex
import types
import typing
from typing import Any, Unpack

import pytest
from embedserve.client import (
    AsyncClient,
    AsyncWordVectors,
    BatchSettings,
    BatchSpec,
    Client,
    SharedMemoryRegion,
    SyncSharedMemoryRegion,
    SyncWordVectors,
)
from embedserve.client.torch import StreamingDataset

# Where an async signature names an async type, its twin names the sync one.
TWINS: dict[Any, Any] = {
    AsyncClient: Client,
    AsyncWordVectors: SyncWordVectors,
    SharedMemoryRegion: SyncSharedMemoryRegion,
}
CONTEXT_MANAGER = {"__aenter__": "__enter__", "__aexit__": "__exit__"}


def _sync_form(annotation: Any) -> Any:
    """The annotation a sync twin gives where its original has this one: AsyncGenerator[Y, S] is
    Generator[Y, S, None], AsyncIterator[Y] is Iterator[Y], `Iterable[X] | AsyncIterable[X]` is
    Iterable[X], and the TWINS stand in for one another."""
    if annotation in TWINS:
        return TWINS[annotation]
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is collections.abc.AsyncGenerator:
        return types.GenericAlias(collections.abc.Generator, (_sync_form(arguments[0]), arguments[1], None))
    if origin is collections.abc.AsyncIterator:
        return types.GenericAlias(collections.abc.Iterator, (_sync_form(arguments[0]),))
    if origin is collections.abc.AsyncIterable:
        return types.GenericAlias(collections.abc.Iterable, (_sync_form(arguments[0]),))
    if origin in (typing.Union, types.UnionType):
        members = list(dict.fromkeys(_sync_form(member) for member in arguments))
        if members != list(arguments):
            return functools.reduce(operator.or_, members)
    return annotation


def _signature(function: Any) -> inspect.Signature:
    return inspect.signature(function, eval_str=True)


def _as_sync(signature: inspect.Signature) -> inspect.Signature:
    return signature.replace(
        parameters=[
            parameter.replace(annotation=_sync_form(parameter.annotation))
            for parameter in signature.parameters.values()
        ],
        return_annotation=_sync_form(signature.return_annotation),
    )


def _public(instance: object) -> set[str]:
    return {name for name in dir(instance) if not name.startswith("_")}


def _assert_twins(original: object, twin: object) -> None:
    """Same public names; for each method the same parameters (names, kinds, defaults and
    annotations, in sync form); for each attribute a value of the twin type."""
    assert _public(twin) == _public(original), type(twin).__name__
    for name in sorted(_public(original)):
        expected = inspect.getattr_static(type(original), name, None)
        if inspect.isfunction(expected):
            got = inspect.getattr_static(type(twin), name)
            assert inspect.isfunction(got), name
            assert _signature(got) == _as_sync(_signature(expected)), f"{type(twin).__name__}.{name}"
        else:
            value = getattr(original, name)
            assert type(getattr(twin, name)) is TWINS.get(type(value), type(value)), name


async def test_client_has_every_public_method_and_attribute_of_async_client() -> None:
    async with AsyncClient("127.0.0.1:1") as original:
        with Client("127.0.0.1:1") as twin:
            _assert_twins(original, twin)
            _assert_twins(original.word_vectors, twin.word_vectors)
            _assert_twins(original.shared_memory(4096), twin.shared_memory(4096))
    # Built the same way: every argument of AsyncClient, with its default.
    assert _signature(Client.__init__) == _signature(AsyncClient.__init__)
    for entering, entered in CONTEXT_MANAGER.items():
        for original_type, twin_type in TWINS.items():
            if entering in vars(original_type):
                expected = _as_sync(_signature(getattr(original_type, entering)))
                assert _signature(getattr(twin_type, entered)) == expected, f"{twin_type.__name__}.{entered}"


def test_the_sync_forms_of_async_annotations() -> None:
    assert _sync_form(collections.abc.AsyncGenerator[int, None]) == collections.abc.Generator[int, None, None]
    assert (
        _sync_form(collections.abc.Iterable[str] | collections.abc.AsyncIterable[str])
        == (collections.abc.Iterable[str])
    )
    assert _sync_form(SharedMemoryRegion | None) == SyncSharedMemoryRegion | None
    assert _sync_form(int | None) == int | None


def test_batch_settings_are_batch_spec_fields() -> None:
    assert typing.get_type_hints(BatchSettings) == typing.get_type_hints(BatchSpec)
    assert not BatchSettings.__total__
    fields = {field.name for field in dataclasses.fields(BatchSpec)}
    for function in (AsyncClient.stream_batches, Client.stream_batches, StreamingDataset.__init__):
        parameters = _signature(function).parameters
        assert not fields & set(parameters), function.__qualname__
        assert parameters["spec"].annotation == BatchSpec | None
        settings = parameters["settings"]
        assert settings.kind is inspect.Parameter.VAR_KEYWORD
        assert settings.annotation == Unpack[BatchSettings]


def test_batch_spec_defaults_and_replace() -> None:
    spec = BatchSpec()
    assert (spec.batch_size, spec.max_length, spec.stride, spec.shuffle, spec.seed, spec.drop_last) == (
        4,
        256,
        128,
        True,
        0,
        True,
    )
    assert (spec.include_embeddings, spec.embeddings_dtype, spec.epoch, spec.epochs) == (
        False,
        "float32",
        0,
        1,
    )
    assert (spec.rank, spec.world_size, spec.batches_per_message) == (0, 1, None)
    assert spec.replace(seed=3) == BatchSpec(seed=3)
    assert spec.replace() == spec
    with pytest.raises(TypeError):
        spec.replace(sead=3)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]


def test_batch_spec_gives_the_cli_one_flag_per_field() -> None:
    parser = argparse.ArgumentParser()
    BatchSpec.add_arguments(parser)
    names = [field.name for field in dataclasses.fields(BatchSpec)]
    assert list(vars(parser.parse_args([]))) == names
    assert BatchSpec.from_arguments(parser.parse_args([])) == BatchSpec()
    arguments = parser.parse_args(
        shlex.split(
            "--batch-size 2 --max-length 4 --stride 3 --no-shuffle --seed 9 --no-drop-last --embeddings "
            "--embeddings-dtype bfloat16 --epoch 1 --epochs 2 --rank 1 --world-size 2 "
            "--batches-per-message 5"
        )
    )
    assert BatchSpec.from_arguments(arguments) == BatchSpec(
        batch_size=2,
        max_length=4,
        stride=3,
        shuffle=False,
        seed=9,
        drop_last=False,
        include_embeddings=True,
        embeddings_dtype="bfloat16",
        epoch=1,
        epochs=2,
        rank=1,
        world_size=2,
        batches_per_message=5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--embeddings-dtype", "int8"])
    help_text = " ".join(parser.format_help().split())
    for field in dataclasses.fields(BatchSpec):
        assert field.metadata["help"].split("(")[0].strip() in help_text, field.name
