"""Stream cursors: where a StreamBatches stream stands, and under which settings.

A cursor names the next batch (epoch, index for this rank) together with everything that
decides which windows that batch holds: the source's token hash, the tokenizer, max_length,
stride, batch_size, drop_last, seed, shuffle, rank and world_size. Resuming with other
settings would silently read other windows, so a mismatch is refused with the fields that
differ. The encoding is compact JSON with a checksum: opaque to clients, readable in a log.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields

from .errors import PreconditionFailed

_MAGIC = b"esc1"


@dataclass(frozen=True)
class StreamSettings:
    """Everything that decides which windows each batch of a rank's stream holds."""

    source_sha256: str
    tokenizer: str
    max_length: int
    stride: int
    batch_size: int
    drop_last: bool
    seed: int
    shuffle: bool
    rank: int
    world_size: int


@dataclass(frozen=True)
class Position:
    """The next batch to deliver."""

    epoch: int
    batch: int


@functools.lru_cache(maxsize=64)
def _settings_json(settings: StreamSettings) -> str:
    return json.dumps(asdict(settings), separators=(",", ":"), sort_keys=True)


def encode_cursor(settings: StreamSettings, position: Position) -> bytes:
    # What json.dumps(..., sort_keys=True) gives for the whole object, with the settings (the same
    # for every batch of a stream) serialized once.
    body = (
        f'{{"batch":{int(position.batch)},"epoch":{int(position.epoch)},'
        f'"settings":{_settings_json(settings)}}}'
    ).encode()
    check = hashlib.sha256(body).digest()[:8]
    return _MAGIC + base64.b64encode(check + body)


def decode_cursor(cursor: bytes, settings: StreamSettings) -> Position:
    """The position a cursor names; PreconditionFailed, naming what differs, unless it fits `settings`."""
    try:
        if not cursor.startswith(_MAGIC):
            raise ValueError("not an embedserve cursor")
        raw = base64.b64decode(cursor[len(_MAGIC) :], validate=True)
        check, body = raw[:8], raw[8:]
        if hashlib.sha256(body).digest()[:8] != check:
            raise ValueError("its checksum does not match (corrupted or edited)")
        content = json.loads(body)
        recorded = StreamSettings(**content["settings"])
        position = Position(int(content["epoch"]), int(content["batch"]))
    except (ValueError, KeyError, TypeError) as error:
        raise PreconditionFailed(f"the cursor cannot be read: {error}") from None
    differing = [
        f"{field.name} (cursor {getattr(recorded, field.name)!r}, request {getattr(settings, field.name)!r})"
        for field in fields(StreamSettings)
        if getattr(recorded, field.name) != getattr(settings, field.name)
    ]
    if differing and recorded.source_sha256 != settings.source_sha256:
        raise PreconditionFailed(
            "the source has changed since the cursor was made (a corpus appended to, prepared again "
            "or replaced; or another text): its tokens' identity was "
            f"{recorded.source_sha256[:16]}..., it is now {settings.source_sha256[:16]}...; start the "
            "stream again without the cursor, or stream a copy of the old corpus. Differing: "
            + "; ".join(differing),
            reason="SOURCE_CHANGED",
            metadata={"cursor_source": recorded.source_sha256, "source": settings.source_sha256},
        )
    if differing:
        raise PreconditionFailed("the cursor belongs to another stream: " + "; ".join(differing))
    if position.epoch < 0 or position.batch < 0:
        raise PreconditionFailed("the cursor names a negative position")
    return position
