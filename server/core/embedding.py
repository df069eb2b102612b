"""Token + absolute positional embeddings on a device-resident model.

input_embeddings = token_embedding(ids) + positional_embedding(positions), as
the reference notebook computes with two nn.Embedding layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812

from .device_thread import DeviceThread
from .errors import InvalidInput, LimitExceeded, StartupError

_LOGGER = logging.getLogger(__name__)

# Names under which checkpoints store the two tables: GPT-2 (Hugging Face
# GPT2Model / GPT2LMHeadModel) and the from-scratch GPTModel of the notebook's book.
TOKEN_EMBEDDING_KEYS = ("wte.weight", "transformer.wte.weight", "tok_emb.weight")
POSITION_EMBEDDING_KEYS = ("wpe.weight", "transformer.wpe.weight", "pos_emb.weight")
_NESTED_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")

OUTPUT_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def tensor_bytes(tensor: torch.Tensor) -> npt.NDArray[np.uint8]:
    """A CPU tensor's elements as flat little-endian bytes, without a copy when it is contiguous.

    numpy has no bfloat16, so those go through their int16 bit patterns. (x86-64 and arm64 hosts
    are little-endian, so the native layout is the wire layout.)
    """
    contiguous = tensor.detach().contiguous()
    raw = contiguous.view(torch.int16) if contiguous.dtype == torch.bfloat16 else contiguous
    return raw.numpy().reshape(-1).view(np.uint8)


# A job at least this large is looked up on its own, straight into its `out`, on the CPU;
# smaller ones share one batched lookup and are copied into theirs.
DIRECT_LOOKUP_TOKENS = 512


@dataclass(frozen=True)
class EmbedJob:
    """One request's lookup: IDs [B, T] or [T] (already check()ed) and its options.

    `out`, when given, is a CPU tensor of the result's shape and dtype (a view of the reply being
    built, or of a shared-memory region) that the result is written into.
    """

    token_ids: npt.NDArray[np.integer]
    position_offset: int = 0
    include_positional: bool = True
    output_dtype: torch.dtype = torch.float32
    out: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.token_ids.size)


@dataclass(frozen=True)
class EmbeddingTables:
    """The two weight matrices on the CPU, before they move to the device."""

    token: torch.Tensor  # [vocab_size, dim]
    position: torch.Tensor  # [context_length, dim]
    source: str


def seeded_embedding_tables(vocab_size: int, dim: int, context_length: int, seed: int) -> EmbeddingTables:
    """Exactly the notebook's tables: manual_seed, then the token layer, then the positional one."""
    for name, value in (("vocab_size", vocab_size), ("dim", dim), ("context_length", context_length)):
        if value <= 0:
            raise StartupError(f"{name} must be positive, got {value}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        token = torch.nn.Embedding(vocab_size, dim)
        position = torch.nn.Embedding(context_length, dim)
    return EmbeddingTables(token.weight.detach(), position.weight.detach(), f"seed:{seed}")


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise StartupError(f"--weights {path}: no such file")
    with path.open("rb") as f:
        head = f.read(9)
    # A safetensors file opens with an 8-byte header length, then the JSON header.
    is_safetensors = path.suffix == ".safetensors" or head[8:9] == b"{"
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StartupError(
            f"--weights {path}: cannot read it as safetensors or a torch state dict: {exc}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise StartupError(f"--weights {path}: holds a {type(loaded).__name__}, not a state dict")
    for nested in _NESTED_STATE_DICT_KEYS:
        if nested in loaded and isinstance(loaded[nested], Mapping):
            loaded = loaded[nested]
            break
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _pick(
    state: Mapping[str, torch.Tensor], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path
) -> torch.Tensor:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in state:
            table = state[name]
            if table.ndim != 2:
                raise StartupError(f"--weights {path}: {name} has shape {tuple(table.shape)}, expected 2-D")
            return table
    shown = ", ".join(sorted(state)[:20]) or "none"
    raise StartupError(f"--weights {path}: no {what} table under {' or '.join(names)} (keys: {shown})")


def load_embedding_tables(
    path: Path,
    *,
    token_key: str | None = None,
    position_key: str | None = None,
    vocab_size: int | None = None,
    dim: int | None = None,
    context_length: int | None = None,
) -> EmbeddingTables:
    """Reads the two tables from safetensors or a torch state dict (weights_only).

    Sizes given explicitly must match the file; a mismatch is a startup error.
    """
    state = _read_state_dict(path)
    token = _pick(state, token_key, TOKEN_EMBEDDING_KEYS, "token embedding", path)
    position = _pick(state, position_key, POSITION_EMBEDDING_KEYS, "positional embedding", path)
    found = {"vocab_size": token.shape[0], "dim": token.shape[1], "context_length": position.shape[0]}
    for name, expected in (("vocab_size", vocab_size), ("dim", dim), ("context_length", context_length)):
        if expected is not None and expected != found[name]:
            raise StartupError(
                f"--weights {path}: the file's {name} is {found[name]} but --{name.replace('_', '-')} "
                f"is {expected} (token table {tuple(token.shape)}, positional table {tuple(position.shape)})"
            )
    if position.shape[1] != token.shape[1]:
        raise StartupError(
            f"--weights {path}: token table {tuple(token.shape)} and positional table "
            f"{tuple(position.shape)} differ in width"
        )
    return EmbeddingTables(token.float(), position.float(), f"file:{path}")


def resolve_device(name: str) -> torch.device:
    """torch.device for --device; "auto" is the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise StartupError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"--device {name}: CUDA is not available on this machine")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise StartupError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", index)
    return device


def _placed(
    tables: EmbeddingTables, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token table, the positional table, and the positional table with one zero row past the
    end (the position of tokens embedded without positions, so requests with and without them
    share one batched lookup), on the device."""
    token = tables.token.to(device=device, dtype=dtype).contiguous()
    position = tables.position.to(device=device, dtype=dtype).contiguous()
    return token, position, torch.cat([position, position.new_zeros((1, position.shape[1]))])


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Runs the block with one OpenMP thread. A CPU lookup is a memory gather: a second thread
    makes one lookup alone faster, but then spins on the core the event loop needs to send the
    reply, and a server under load serves fewer (docs/performance.md, "one device thread")."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class EmbeddingModel:
    """The two tables resident on one device; lookups run on the process's thread for that device."""

    def __init__(
        self,
        tables: EmbeddingTables,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        device_thread: DeviceThread | None = None,
    ) -> None:
        """device_thread: a lease on the device's thread to share (the model takes its own lease
        on that thread and closes it in close()); None: the process's thread for `device`."""
        if device_thread is not None and device_thread.device != device:
            raise ValueError(f"a model on {device} given the device thread of {device_thread.device}")
        self.device = device
        self.dtype = dtype
        self.source = tables.source
        # The batchers run embed_many() here; the tables move to the device here too.
        self.device_thread = DeviceThread.shared(device) if device_thread is None else device_thread.share()
        try:
            self._token, self._position, self._position_or_zero = self.device_thread.call(
                _placed, tables, device, dtype
            )
        except BaseException:
            self.device_thread.close()
            raise
        self._pin = device.type == "cuda"

    @property
    def vocab_size(self) -> int:
        return int(self._token.shape[0])

    @property
    def dim(self) -> int:
        return int(self._token.shape[1])

    @property
    def context_length(self) -> int:
        return int(self._position.shape[0])

    def check(
        self,
        token_ids: npt.NDArray[np.integer],
        *,
        position_offset: int = 0,
        include_positional: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        """Raises InvalidInput unless embed() would succeed on these arguments."""
        if not np.issubdtype(token_ids.dtype, np.integer):
            raise InvalidInput(f"token IDs must be integers, got {token_ids.dtype}")
        if token_ids.ndim not in (1, 2):
            raise InvalidInput(f"token IDs must be [T] or [B, T], got shape {list(token_ids.shape)}")
        if token_ids.size == 0:
            raise InvalidInput(f"token IDs are empty (shape {list(token_ids.shape)})")
        if max_tokens is not None and token_ids.size > max_tokens:
            raise LimitExceeded(
                f"{token_ids.size} token IDs are over the server's --max-tokens-per-request {max_tokens}",
                limit="max_tokens_per_request",
                allowed=max_tokens,
                requested=int(token_ids.size),
            )
        if position_offset < 0:
            raise InvalidInput(f"position_offset must be >= 0, got {position_offset}")
        length = token_ids.shape[-1]
        if include_positional and position_offset + length > self.context_length:
            # A limit the client acts on (split the windows), so it carries LIMIT_EXCEEDED's detail.
            raise LimitExceeded(
                f"sequence length {length} + position_offset {position_offset} exceeds the context "
                f"length {self.context_length} (--context-length)",
                limit="context_length",
                allowed=self.context_length,
                requested=position_offset + length,
            )
        bad = np.flatnonzero((token_ids < 0) | (token_ids >= self.vocab_size))
        if bad.size:
            first = int(bad[0])
            where = [int(i) for i in np.unravel_index(first, token_ids.shape)]
            raise InvalidInput(
                f"token id {int(token_ids.flat[first])} at position {where} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    def embed(
        self,
        token_ids: npt.NDArray[np.integer],
        *,
        position_offset: int = 0,
        include_positional: bool = True,
        output_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """[B, T] (or [T]) IDs -> [B, T, D] (or [T, D]) on the CPU: embed_many() of this one job."""
        job = EmbedJob(token_ids, position_offset, include_positional, output_dtype)
        return self.embed_many([job])[0]

    def embed_many(self, jobs: list[EmbedJob]) -> list[torch.Tensor]:
        """Several requests (of one output dtype) as one lookup: one transfer in, one out.

        Each result equals embed() of that job alone, bit for bit: the same two rows are added.
        IDs go to a GPU through pinned memory and results come back in one copy into pinned
        memory; each job gets a view of that batch's host tensor, or its `out` filled. On the
        CPU, large jobs with an `out` are looked up straight into it.
        """
        if not jobs:
            return []
        output_dtype = jobs[0].output_dtype
        if any(job.output_dtype != output_dtype for job in jobs):
            raise ValueError("embed_many needs one output dtype per batch")
        for job in jobs:
            self._check_positions(job)
            if job.out is not None and (
                job.out.shape != (*job.token_ids.shape, self.dim) or job.out.dtype != output_dtype
            ):
                raise ValueError(f"out is {job.out.dtype}{list(job.out.shape)}, not the job's result")
        on_cpu = self.device.type == "cpu"
        with _one_intra_op_thread() if on_cpu else contextlib.nullcontext():
            return self._embed_checked(jobs, on_cpu)

    def _embed_checked(self, jobs: list[EmbedJob], on_cpu: bool) -> list[torch.Tensor]:
        def looked_up_directly(job: EmbedJob) -> bool:
            return on_cpu and job.out is not None and job.tokens >= DIRECT_LOOKUP_TOKENS

        batched_results = iter(self._embed_batched([job for job in jobs if not looked_up_directly(job)]))
        pieces = []
        for job in jobs:
            if looked_up_directly(job):
                assert job.out is not None
                self._embed_into(job, job.out)
                pieces.append(job.out)
                continue
            result = next(batched_results)
            if job.out is not None:
                job.out.copy_(result)
                result = job.out
            pieces.append(result)
        return pieces

    def _check_positions(self, job: EmbedJob) -> None:
        if not job.include_positional:
            return
        first, end = job.position_offset, job.position_offset + job.token_ids.shape[-1]
        if first < 0:
            raise InvalidInput(
                f"positions {first}..{end - 1} are outside the context length {self.context_length}"
            )
        if end > self.context_length:
            raise LimitExceeded(
                f"positions {first}..{end - 1} are outside the context length {self.context_length} "
                "(--context-length)",
                limit="context_length",
                allowed=self.context_length,
                requested=end,
            )

    def _checked_ids(self, jobs: list[EmbedJob], ids: npt.NDArray[np.int64]) -> None:
        # Always checked, cheaply: an index past the table is a device-side assert on CUDA, which
        # poisons the context for good. check() then names the first bad ID and its position.
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            for job in jobs:
                self.check(job.token_ids, include_positional=False)

    def _embed_into(self, job: EmbedJob, out: torch.Tensor) -> None:
        """One job on the CPU, written into out: the token rows, then the positions added in place."""
        ids = np.ascontiguousarray(job.token_ids, dtype=np.int64).reshape(-1)
        self._checked_ids([job], ids)
        length = job.token_ids.shape[-1]
        with torch.inference_mode():
            # In the model's dtype, as the batched lookup adds, then converted once.
            target = out if out.dtype == self.dtype else torch.empty(out.shape, dtype=self.dtype)
            torch.index_select(self._token, 0, torch.from_numpy(ids), out=target.view(-1, self.dim))
            if job.include_positional:
                positions = self._position[job.position_offset : job.position_offset + length]
                target.view(-1, length, self.dim).add_(positions)
            if target is not out:
                out.copy_(target)

    def _embed_batched(self, jobs: list[EmbedJob]) -> list[torch.Tensor]:
        if not jobs:
            return []
        output_dtype = jobs[0].output_dtype
        flat_ids = [np.ascontiguousarray(job.token_ids, dtype=np.int64).reshape(-1) for job in jobs]
        positions = []
        for job in jobs:
            length = job.token_ids.shape[-1]
            if job.include_positional:
                row = np.arange(job.position_offset, job.position_offset + length, dtype=np.int64)
            else:
                row = np.full(length, self.context_length, dtype=np.int64)
            positions.append(np.broadcast_to(row, job.token_ids.shape).reshape(-1))
        stacked = np.stack([np.concatenate(flat_ids), np.concatenate(positions)])
        self._checked_ids(jobs, stacked[0])
        host = torch.from_numpy(stacked)
        with torch.inference_mode():
            if self._pin:
                host = host.pin_memory()
            indexes = host.to(self.device, non_blocking=True)
            out = F.embedding(indexes[0], self._token)
            out += F.embedding(indexes[1], self._position_or_zero)
            out = out.to(output_dtype)
            if self._pin:
                result = torch.empty(out.shape, dtype=output_dtype, pin_memory=True)
                result.copy_(out, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            else:
                result = out
        pieces = []
        start = 0
        for job in jobs:
            pieces.append(result[start : start + job.tokens].view(*job.token_ids.shape, self.dim))
            start += job.tokens
        return pieces

    def close(self) -> None:
        """Gives back the model's lease on the device thread, cancelling its queued lookups."""
        self.device_thread.close()
