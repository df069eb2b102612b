"""Encodes one stretch of text in a child process (see stretch_encoding.ChildProcessEncoder).

Run by path, not as a module of the package, so that the child imports tiktoken alone (not the
server's torch). Reads one pickle from stdin: the encoding's definition, the allowed special
tokens and the text. Writes the token IDs to stdout as little-endian uint32, and exits 0; a
special token the text may not contain is exit 2 with tiktoken's message on stderr.
"""

from __future__ import annotations

import pickle
import sys

DISALLOWED_SPECIAL_EXIT = 2


def main() -> int:
    import tiktoken

    job = pickle.loads(sys.stdin.buffer.read())  # from the parent process only
    encoding = tiktoken.Encoding(
        name=job["name"],
        pat_str=job["pat_str"],
        mergeable_ranks=job["mergeable_ranks"],
        special_tokens=job["special_tokens"],
    )
    try:
        ids = encoding.encode_to_numpy(job["text"], allowed_special=job["allowed_special"])
    except ValueError as error:
        sys.stderr.write(str(error))
        return DISALLOWED_SPECIAL_EXIT
    sys.stdout.buffer.write(ids.astype("<u4", copy=False).tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
