"""What each request holds in memory at most while it runs: the bytes it asks the memory budget
for before its work starts (memory_budget.py).

Each estimate counts the copies one request's data goes through (the received message, its
parsed form, the working arrays, the encoded reply and gRPC's copy of it) and is an upper bound
of what was measured for its worst case. docs/operations.md ("Memory budget") lists them with
the command that measures them (bench/hostile.py --calibrate).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MIB = 1 << 20
# tiktoken's memory while it encodes one pre-tokenizer piece, per byte of the piece: the worst
# case is one long piece (a long run of one character, a long word).
BPE_BYTES_PER_BYTE = 56
# A child process that encodes a long stretch (stretch_encoding.ChildProcessEncoder) before it
# reads its text: the interpreter, tiktoken and the vocabulary.
ENCODE_CHILD_BYTES = 96 * MIB
# Copies of a request's own bytes held while it runs: gRPC's, the bytes handed to the parser,
# the parsed message's, and the Python objects made from it.
REQUEST_COPIES = 4
# What any call holds besides its data: its state in gRPC and the Python objects of its handling.
CALL_BYTES = 1 << 20
# Copies of a reply's bytes held at once: the array (or the reply built in place), the encoded
# message and gRPC's copy of it.
REPLY_COPIES = 3
# Copies of a reply built around its tensor (_codec.TensorReply): its bytes and gRPC's copy.
ENCODED_REPLY_COPIES = 2
# Token IDs are int32 on the wire and in the working arrays.
TOKEN_ID_BYTES = 4
# While a text is being encoded, every stretch's IDs and their concatenation are held (and what
# the allocator keeps of them), and at most one token per byte of text comes out.
ENCODE_ID_COPIES = 3
# A Python int for each token ID while it is decoded (tiktoken's decode takes a list).
DECODE_BYTES_PER_TOKEN = 48
# One ranked MostSimilar result: its row and score while ranked, its word as a Python str and in
# the reply, and its score there.
RESULT_BYTES = 400
# One word of a request while it is looked up: its Python str, and its place in lists and dicts.
WORD_BYTES = 256
# An analogy evaluation: its question file's text, parsed into sections and questions, per byte;
# and per word it may rank, its case-folded index and its share of the batched scans.
QUESTION_BYTES_PER_BYTE = 16
EVALUATION_BYTES_PER_WORD = 1024


def str_bytes(text: str) -> int:
    """Memory of the Python str itself (1, 2 or 4 bytes per character, and its header)."""
    return sys.getsizeof(text)


def utf8_per_char(text: str) -> int:
    """An upper bound of the UTF-8 bytes of any character of `text`, without encoding it."""
    if text.isascii():
        return 1
    per_char = (sys.getsizeof(text) - sys.getsizeof("")) // max(1, len(text))
    return {1: 2, 2: 3}.get(per_char, 4)


def utf8_bound(text: str) -> int:
    """An upper bound of len(text.encode()), without encoding it."""
    return len(text) * utf8_per_char(text)


def encode_working_bytes(text_bytes: int, longest_in_thread: int, longest_in_child: int) -> int:
    """Encoding texts of `text_bytes` UTF-8 bytes (already received): their token IDs at one per
    byte at most, and tiktoken's memory for the longest stretch encoded on a thread and in a
    child process (UTF-8 bytes; 0 when none). The texts themselves are the request's."""
    ids = ENCODE_ID_COPIES * TOKEN_ID_BYTES * text_bytes
    in_thread = BPE_BYTES_PER_BYTE * longest_in_thread
    in_child = BPE_BYTES_PER_BYTE * longest_in_child + ENCODE_CHILD_BYTES if longest_in_child else 0
    return ids + max(in_thread, in_child)


def texts_bytes(texts: Sequence[str]) -> int:
    """A request's texts as it holds them: the message's bytes and the Python strs."""
    return CALL_BYTES + sum(utf8_bound(text) * (REQUEST_COPIES - 1) + str_bytes(text) for text in texts)


def request_bytes(wire_bytes: int) -> int:
    """A request of `wire_bytes` bytes on the wire, as the server holds it while it runs."""
    return CALL_BYTES + REQUEST_COPIES * wire_bytes


def words_bytes(words: int) -> int:
    """The words a word-vector request names, as Python objects."""
    return WORD_BYTES * words


def reply_bytes(payload_bytes: int) -> int:
    """A reply carrying `payload_bytes` of tensors or text, until it is sent."""
    return REPLY_COPIES * payload_bytes


def encoded_reply_bytes(payload_bytes: int) -> int:
    """A reply built around its tensor (a lookup writes straight into the reply's bytes): those
    bytes and gRPC's copy of them."""
    return ENCODED_REPLY_COPIES * payload_bytes


def token_ids_reply_bytes(tokens: int) -> int:
    """`tokens` token IDs in an array and in the reply made of them."""
    return TOKEN_ID_BYTES * tokens + reply_bytes(TOKEN_ID_BYTES * tokens)


def text_stream_bytes(ids_bytes: int) -> int:
    """A StreamBatches stream of a request's text, for as long as it runs: its token IDs, and the
    shuffled window orders of two epochs (at most one window per token, int32)."""
    return 3 * ids_bytes


def decode_working_bytes(tokens: int, token_bytes: int) -> int:
    """Decoding `tokens` IDs whose tokens hold `token_bytes` bytes: the IDs as Python ints, the
    text as a str (up to four bytes a character) and as the reply (a byte that is not valid UTF-8
    decodes to U+FFFD, three bytes)."""
    return DECODE_BYTES_PER_TOKEN * tokens + 4 * token_bytes + reply_bytes(3 * token_bytes)


def ranked_results_bytes(results: int) -> int:
    """A MostSimilar reply of up to `results` ranked results."""
    return RESULT_BYTES * results


def evaluation_bytes(text_bytes: int, ranked_words: int) -> int:
    """An analogy evaluation of a question file of `text_bytes` bytes among `ranked_words` words."""
    return CALL_BYTES + QUESTION_BYTES_PER_BYTE * text_bytes + EVALUATION_BYTES_PER_WORD * ranked_words
