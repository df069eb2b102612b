"""Hostile input: every RPC fed hypothesis-generated and malformed messages answers with a clear
status (never INTERNAL or UNKNOWN), and the server stays alive and correct afterwards."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from embedserve.server.app import Components
from embedserve.tensor import varint
from embedserve.v1 import batches_pb2, embedding_pb2, tokenizer_pb2, word_vectors_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory, text_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import ServerThread
from .conftest import Scale

FieldDescriptor = pb_descriptor.FieldDescriptor
METHODS = [
    method
    for module in (tokenizer_pb2, batches_pb2, embedding_pb2, word_vectors_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
# Statuses a hostile request may get. INTERNAL and UNKNOWN mean the server did not understand
# its own failure; DEADLINE_EXCEEDED would mean unbounded work.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
# The longest legitimate call is a full analogy evaluation over GloVe (an empty EvaluateAnalogies
# request): seconds, and two or three times that on a slow VM. A call that hangs still fails here.
CALL_SECONDS = 60.0
STREAM_REPLIES_READ = 3
STREAM_SECONDS = 0.5

HOSTILE_STRINGS = st.sampled_from(
    ["", "king", "<|endoftext|>", "../../../etc/passwd", "\x00", "é" * 3, "🙂", " " * 1000, "a" * 3_000_000]
)
WORDS = st.sampled_from(["king", "queen", "man", "woman", "paris", "the", "computer", "the-verdict.txt"])
INT_EDGES = [0, 1, -1, 2, 3, 7, 64, 1023, 1024, 50256, 50257, 2**31 - 1, -(2**31)]
INT64_EDGES = [*INT_EDGES, 2**62, 2**63 - 1, -(2**63), 10**12]


def _int_strategy(field: FieldDescriptor) -> st.SearchStrategy[int]:
    kind = field.type
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 70), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 70), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
    wide = kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64)
    return st.one_of(st.integers(-3, 70), st.sampled_from(INT64_EDGES if wide else INT_EDGES))


def _tensor_strategy(preferred_dtypes: list[int]) -> st.SearchStrategy[Message]:
    """Tensors that are mostly well formed (so requests get past parsing into the checks behind
    it), with hostile values: IDs out of range, NaN and infinities, and sometimes a dtype, shape
    and byte count that disagree."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        from embedserve.v1 import tensor_pb2

        dtype: Any = draw(st.one_of(st.sampled_from(preferred_dtypes), st.integers(-1, 8)))
        small_dims = st.integers(0, 5)
        dims = st.one_of(small_dims, small_dims, st.sampled_from([-1, 2**31, 2**62]))
        shape = draw(st.lists(dims, max_size=3))
        count = 1
        for dim in shape:
            count *= max(dim, 0)
        if count > 512 or not draw(st.integers(0, 3)):
            return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))
        if dtype in (1, 2) and count:
            ids = st.one_of(st.integers(0, 60), st.sampled_from([-1, 50256, 50257, 2**31 - 1, -(2**31)]))
            values = draw(st.lists(ids, min_size=count, max_size=count))
            data = struct.pack(f"<{count}{'i' if dtype == 1 else 'q'}", *values)
        elif dtype == 3:
            floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
            data = struct.pack(f"<{count}f", *draw(st.lists(floats, min_size=count, max_size=count)))
        else:
            data = bytes(count * 2)
        if not draw(st.integers(0, 5)):
            data = data[:-1]  # one byte short
        return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)

    return build()


def _value_strategy(field: FieldDescriptor, depth: int, sparse: bool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        if field.message_type.full_name == "embedserve.v1.Tensor":
            return _tensor_strategy([3, 4] if "vector" in field.name else [1, 2])
        return message_strategy(field.message_type, depth + 1, sparse)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), HOSTILE_STRINGS, WORDS)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-2, 8))  # open enums: unknown numbers too
    return _int_strategy(field)


def message_strategy(
    descriptor: pb_descriptor.Descriptor, depth: int = 0, sparse: bool = False
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with any subset of fields set to hostile values (a few, if sparse)."""
    message_class = message_factory.GetMessageClass(descriptor)
    fields = list(descriptor.fields) if depth < 3 else []

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class()
        for field in fields:
            present = draw(st.integers(0, 3)) != 0  # three times in four
            if present == sparse:
                continue
            values = _value_strategy(field, depth, sparse)
            if field.is_repeated:
                items = draw(st.lists(values, min_size=1, max_size=4 if depth else 6))
                getattr(message, field.name).extend(items)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(values))
            else:
                setattr(message, field.name, draw(values))
        return message

    return build()


# A valid request per method: mutating a few of its fields reaches the checks past the first one.
SEEDS = {
    "Tokenize": 'texts: "hello world"',
    "Detokenize": "token_ids { dtype: DTYPE_INT32 shape: 2 "
    'data: "\\x75\\x7a\\x00\\x00\\xe3\\x03\\x00\\x00" }',
    "StreamBatches": 'text: "one two three four five six seven eight nine ten eleven twelve" batch_size: 2 '
    "max_length: 4 stride: 2 include_embeddings: true",
    "Embed": "token_ids { dtype: DTYPE_INT32 shape: [1, 2] "
    'data: "\\x01\\x00\\x00\\x00\\x02\\x00\\x00\\x00" }',
    "EmbedStream": "token_ids { dtype: DTYPE_INT32 shape: 2 "
    'data: "\\x01\\x00\\x00\\x00\\x02\\x00\\x00\\x00" }',
    "SharedMemorySession": "byte_size: 4096",
    "GetVectors": 'words: ["king", "queen"]',
    "MostSimilar": 'queries { positive { word: "king" } positive { word: "woman" } '
    'negative { word: "man" } topn: 3 }',
    # The same request as the SDK's columns, plus a raw-vector term and 3CosMul.
    "MostSimilar packed": 'packed { words: ["king", "woman", "man", "", "paris"] '
    "positive_counts: [2, 2] negative_counts: [1, 0] topn: [3, 4] restrict_vocab: [0, 1000] "
    "methods: [SIMILARITY_METHOD_COS_ADD, SIMILARITY_METHOD_COS_MUL] "
    "weights: [2.0, nan, nan, nan, nan] vector_terms: 3 "
    'vectors { dtype: DTYPE_FLOAT16 shape: [1, 50] data: "' + "\\x00\\x3c" * 50 + '" } }',
    "Similarity": 'pairs { first: "king" second: "queen" }',
    "Distance": 'pairs { first: "king" second: "queen" }',
    "DoesntMatch": 'words: ["breakfast", "lunch", "dinner", "cereal"]',
    "EvaluateAnalogies": 'questions: ": capital\\nathens greece baghdad iraq\\n"',
}


def method_seeds(method: pb_descriptor.MethodDescriptor) -> list[Message]:
    """The method's valid seed requests (SEEDS[name], and SEEDS["name variant"] for other forms)."""
    message_class = message_factory.GetMessageClass(method.input_type)
    texts = [text for name, text in SEEDS.items() if name.split(" ")[0] == method.name] or [""]
    return [text_format.Parse(text, message_class()) for text in texts]


def seeded_strategy(method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """A valid seed of the method's with a few fields replaced by (or extended with) hostile values."""
    message_class = message_factory.GetMessageClass(method.input_type)

    def mutate(seed_and_change: tuple[Message, Message]) -> bytes:
        seed, change = seed_and_change
        mutated = message_class()
        mutated.CopyFrom(seed)
        mutated.MergeFrom(change)
        return bytes(mutated.SerializeToString())

    changes = message_strategy(method.input_type, sparse=True)
    return st.tuples(st.sampled_from(method_seeds(method)), changes).map(mutate)


def malformed_strategy(descriptor: pb_descriptor.Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid message: random, truncated, or invalid UTF-8 in a string field."""
    strings = [field.number for field in descriptor.fields if field.type == FieldDescriptor.TYPE_STRING]
    bad_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"])
    options: list[st.SearchStrategy[bytes]] = [
        st.binary(min_size=1, max_size=80),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\xff\xff\xff", b"\x08"]),
    ]
    if strings:
        options.append(
            st.builds(
                lambda number, text: varint(number << 3 | 2) + varint(len(text)) + text,
                st.sampled_from(strings),
                bad_utf8,
            )
        )
    return st.one_of(options)


def _call(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    """Sends one request (raw bytes), reads a few replies, and returns the final status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if not method.server_streaming:
            channel.unary_unary(path, None, None)(payload, timeout=CALL_SECONDS)
            return grpc.StatusCode.OK
        replies: Any = (
            channel.stream_stream(path, None, None)(iter([payload, payload]), timeout=CALL_SECONDS)
            if method.client_streaming
            else channel.unary_stream(path, None, None)(payload, timeout=CALL_SECONDS)
        )
        # A stream that stays open (a shared-memory session, a long stream) is closed by us.
        closer = threading.Timer(STREAM_SECONDS, replies.cancel)
        closer.start()
        try:
            for count, _ in enumerate(replies, start=1):
                if count >= STREAM_REPLIES_READ:
                    break
        finally:
            closer.cancel()
            replies.cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    if code is grpc.StatusCode.CANCELLED:  # ours
        return grpc.StatusCode.OK
    assert code in CLEAR, f"{path}: {code.name} {details!r} for {payload[:200]!r}"
    return code


def _assert_alive_and_correct(channel: grpc.Channel) -> None:
    tokenize = channel.unary_unary(
        "/embedserve.v1.TokenizerService/Tokenize",
        request_serializer=tokenizer_pb2.TokenizeRequest.SerializeToString,
        response_deserializer=tokenizer_pb2.TokenizeResponse.FromString,
    )
    reply = tokenize(tokenizer_pb2.TokenizeRequest(texts=["hello world"]), timeout=10)
    assert reply.token_ids.data == struct.pack("<2i", 31373, 995)


@pytest.fixture(scope="module")
def hostile_target(default_components: Components) -> Iterator[str]:
    running = ServerThread(default_components.config, default_components)
    # Loaded, so that a word-vector method meets the model and not "still loading".
    default_components.word_vectors.wait(600)
    try:
        yield running.target
    finally:
        running.stop()


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.name)
def test_hostile_messages_get_clear_statuses(hostile_target: str, scale: Scale, method: Any) -> None:
    codes: dict[str, int] = {}
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(hostile_target, options=options) as channel:

        @settings(
            max_examples=scale.hostile_examples, deadline=None, derandomize=not scale.full,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(payload=st.one_of(
            seeded_strategy(method),
            message_strategy(method.input_type).map(lambda m: m.SerializeToString()),
            malformed_strategy(method.input_type),
        ))  # fmt: skip
        def check(payload: bytes) -> None:
            code = _call(channel, method, payload)
            codes[code.name] = codes.get(code.name, 0) + 1
            _assert_alive_and_correct(channel)

        check()
    assert sum(codes.values()) >= scale.hostile_examples // 2
    scale.record(f"hostile_input {method.containing_service.name}/{method.name}", codes)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.name)
def test_seeds_are_valid_requests(hostile_target: str, method: Any) -> None:
    with grpc.insecure_channel(hostile_target) as channel:
        for seed in method_seeds(method):
            assert _call(channel, method, seed.SerializeToString()) is grpc.StatusCode.OK, seed
