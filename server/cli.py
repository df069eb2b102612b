"""`embedserve`: run the server, or call one from a terminal.

embedserve serve [--port 50051 ...]
embedserve tokenize "Hello, world"
embedserve batches --file the-verdict.txt --batch-size 8 --max-length 4 --stride 4 --no-shuffle
embedserve embed 40 367 2885 1464
embedserve info
embedserve similar king woman --negative man -n 10
embedserve similarity woman man
embedserve analogies
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import call_logging
from .config import (
    PROMETHEUS_MULTIPROCESS_VARIABLE,
    ServerConfig,
    add_server_arguments,
    config_from_namespace,
    serve_flags,
)

DEFAULT_TARGET = "127.0.0.1:50051"


def _add_client_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    parser.add_argument(
        "--target",
        default=environ.get("EMBEDSERVE_TARGET", DEFAULT_TARGET),
        help=f"server address (default: {DEFAULT_TARGET}); env EMBEDSERVE_TARGET",
    )
    try:
        timeout = float(environ.get("EMBEDSERVE_TIMEOUT", "30"))
    except ValueError:
        parser.error(f"EMBEDSERVE_TIMEOUT={environ['EMBEDSERVE_TIMEOUT']!r} is not a number of seconds")
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help="seconds before a call gives up (default: 30); env EMBEDSERVE_TIMEOUT",
    )
    for flag, variable, help_text in (
        ("--api-key", "EMBEDSERVE_API_KEY", "send 'authorization: Bearer KEY'"),
        ("--root-cert", "EMBEDSERVE_ROOT_CERT", "PEM file of the CA that signed the server: use TLS"),
        ("--client-cert", "EMBEDSERVE_CLIENT_CERT", "PEM client certificate: mutual TLS"),
        ("--client-key", "EMBEDSERVE_CLIENT_KEY", "PEM private key of --client-cert"),
        ("--server-name", "EMBEDSERVE_SERVER_NAME", "the certificate's name, if not the target's"),
    ):  # fmt: skip
        parser.add_argument(flag, default=environ.get(variable, ""), help=f"{help_text}; env {variable}")


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Client keyword arguments of the shared client flags (PEM files are read here)."""

    def pem(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    if bool(args.client_cert) != bool(args.client_key):
        raise ValueError("--client-cert and --client-key go together")
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return {
        "timeout": args.timeout,
        "api_key": args.api_key or None,
        "root_certificates": pem(args.root_cert),
        "client_certificate": pem(args.client_cert),
        "client_key": pem(args.client_key),
        "options": options,
    }


# libgomp stops spinning once OpenMP threads outnumber cores, as in a server where every thread
# running torch operators leads its own team; each parallel region then wakes its threads through
# the kernel, which slows a word-vector scan's small operators. Active waiting for a bounded spin,
# then sleeping, keeps them quick at no idle cost (docs/performance.md has the measurements).
OPENMP_WAITING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def tune_openmp(environ: MutableMapping[str, str]) -> bool:
    """Sets OPENMP_WAITING unless the operator set either variable; libgomp reads them when torch
    loads, so this must run first. Returns whether it did."""
    if "torch" in sys.modules or any(name in environ for name in OPENMP_WAITING):
        return False
    environ.update(OPENMP_WAITING)
    return True


def _run_serve(args: argparse.Namespace) -> int:
    config = config_from_namespace(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    call_logging.install()  # a reply that gRPC could not send to a cancelled call is no ERROR
    tune_openmp(os.environ)
    if config.workers > 1:
        return _run_workers(config)
    from .app import serve, tune_allocator
    from .core import StartupError

    tune_allocator()
    try:
        stopped = asyncio.run(serve(config))
    except StartupError as exc:
        print(f"embedserve: {exc}", file=sys.stderr)
        return 2
    if not stopped:
        # A gensim read cannot be interrupted; exiting normally would tear down native libraries
        # under that thread (and can abort), so leave at once: nothing is left to flush but logs.
        logging.getLogger(__name__).warning("word vectors still loading; exiting without waiting")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_workers(config: ServerConfig) -> int:
    """Forks `workers` server processes on one port (SO_REUSEPORT) and waits for them.

    The fork happens before any gRPC object, thread or model exists in this process (gRPC
    does not survive a fork of a process that already uses it). Each worker loads its own
    embedding tables; memory-mapped word vectors and prepared corpora are shared by the OS.
    SIGTERM or SIGINT here is passed to every worker; the exit code is 0 when all exit 0.
    With --metrics-port, this process serves the metrics of all workers added up.
    """
    if config.port == 0:
        print(
            "embedserve: --workers needs a fixed --port (with 0 each worker would pick its own)",
            file=sys.stderr,
        )
        return 2
    metrics_folder = None
    if config.metrics_port and PROMETHEUS_MULTIPROCESS_VARIABLE not in os.environ:
        # Before prometheus_client is imported (below, through .app), so it runs in multiprocess mode.
        metrics_folder = tempfile.mkdtemp(prefix="embedserve-metrics-")
        os.environ[PROMETHEUS_MULTIPROCESS_VARIABLE] = metrics_folder
    try:
        return _fork_workers(config)
    finally:
        if metrics_folder is not None:
            shutil.rmtree(metrics_folder, ignore_errors=True)


def _fork_workers(config: ServerConfig) -> int:
    from .app import serve, tune_allocator
    from .core import StartupError
    from .metrics import serve_workers_http, worker_exited
    from .security import check_exposure

    try:  # once, here: the workers never see --metrics-port, which this process serves
        check_exposure(config)
    except StartupError as exc:
        print(f"embedserve: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    worker_config = dataclasses.replace(config, metrics_port=0)  # served here, not by each worker
    children = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                logging.getLogger(__name__).info(
                    "worker %d of %d (pid %d)", index + 1, config.workers, os.getpid()
                )
                asyncio.run(serve(worker_config))  # a load still running is left behind by os._exit
                code = 0
            except StartupError as exc:
                print(f"embedserve: {exc}", file=sys.stderr)
                code = 2
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if config.metrics_port:
        try:
            serve_workers_http(config)
        except StartupError as exc:
            print(f"embedserve: {exc}", file=sys.stderr)
            forward(signal.SIGTERM, None)
            for child in children:
                os.waitpid(child, 0)
            return 2
        logging.getLogger(__name__).info(
            "metrics of %d workers on http://%s:%d/metrics%s", config.workers, config.metrics_host,
            config.metrics_port, " (bearer token required)" if config.metrics_token is not None else "",
        )  # fmt: skip
    codes = []
    for child in children:
        codes.append(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
        if config.metrics_port:
            worker_exited(child)
    return 0 if all(code == 0 for code in codes) else 1


def _run_tokenize(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    with Client(args.target, **_client_options(args)) as client:
        ids = client.tokenize(args.text, allowed_special="all" if args.allow_special else ())
    print(" ".join(str(i) for i in ids))
    return 0


def _run_batches(args: argparse.Namespace) -> int:
    from embedserve.client import BatchSpec, Client

    text = Path(args.file).read_text(encoding="utf-8") if args.file else None
    with Client(args.target, **_client_options(args)) as client:
        stream = client.stream_batches(text=text, corpus=args.corpus, spec=BatchSpec.from_arguments(args))
        count = 0
        for batch in stream:
            if count == 0:
                print(f"batches: {batch.num_batches}")
                print(f"inputs {list(batch.inputs.shape)}, targets {list(batch.targets.shape)}", end="")
                if batch.embeddings is not None:
                    print(f", embeddings {list(batch.embeddings.shape)}", end="")
                print("\nfirst batch inputs:\n" + np.array2string(batch.inputs, max_line_width=120))
                print("first batch targets:\n" + np.array2string(batch.targets, max_line_width=120))
            count += 1
        print(f"received {count} batches")
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    with Client(args.target, **_client_options(args)) as client:
        vectors = client.embed(
            args.ids, include_positional=not args.no_positional, position_offset=args.offset
        )
    print(f"shape {list(vectors.shape)}")
    with np.printoptions(precision=4, suppress=True, edgeitems=4, linewidth=120):
        print(vectors)
    return 0


def _health_port_target(environ: Mapping[str, str]) -> str | None:
    health_port = environ.get("EMBEDSERVE_HEALTH_PORT", "").strip()
    return f"127.0.0.1:{health_port}" if health_port not in ("", "0") else None


def _health_target(environ: Mapping[str, str]) -> str:
    """Where `embedserve health` asks by default: the server's --health-port when it has one (so a
    container's HEALTHCHECK works whether or not the main port speaks TLS), else its --port."""
    health_port_target = _health_port_target(environ)
    if health_port_target is not None:
        return health_port_target
    if "EMBEDSERVE_TARGET" in environ:
        return environ["EMBEDSERVE_TARGET"]
    port = environ.get("EMBEDSERVE_PORT", "").strip()
    return f"127.0.0.1:{port}" if port else DEFAULT_TARGET


def _run_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: exit 0 when SERVING (what container and orchestrator probes run)."""
    import grpc
    from embedserve.client._async import channel_credentials
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = _client_options(args)
    target, credentials = channel_credentials(
        args.target,
        root_certificates=options["root_certificates"],
        client_certificate=options["client_certificate"],
        client_key=options["client_key"],
    )
    if credentials is None or args.target == args.health_port_target:
        # --health-port speaks plaintext, whatever TLS settings the environment holds.
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options=options["options"])
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"embedserve health: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.service or 'server'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _run_info(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    with Client(args.target, **_client_options(args)) as client:
        info = client.info()
    for name, value in vars(info).items():
        if name != "limits":
            print(f"{name}: {value}")
    for name, value in vars(info.limits).items():
        print(f"{name}: {value}")
    return 0


def _run_similar(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    with Client(args.target, **_client_options(args)) as client:
        method = client.word_vectors.most_similar_cosmul if args.cosmul else client.word_vectors.most_similar
        ranked = method(
            positive=args.words, negative=args.negative, topn=args.n, restrict_vocab=args.restrict_vocab
        )
    for word, score in ranked:
        print(f"{word}\t{score:.4f}")
    return 0


def _run_similarity(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    with Client(args.target, **_client_options(args)) as client:
        similarity = client.word_vectors.similarity(args.first, args.second)
        cosine, euclidean = client.word_vectors.distance_batch([(args.first, args.second)])
    print(
        f"similarity {similarity:.4f}  cosine distance {cosine[0]:.4f}  euclidean distance {euclidean[0]:.4f}"
    )
    return 0


def _run_analogies(args: argparse.Namespace) -> int:
    from embedserve.client import Client

    questions = Path(args.file).read_text(encoding="utf-8") if args.file else None
    with Client(args.target, **_client_options(args)) as client:
        result = client.word_vectors.evaluate_word_analogies(questions, restrict_vocab=args.restrict_vocab)
    for name, correct, incorrect in result.sections:
        total = correct + incorrect
        print(f"{name}: {correct / total if total else 0:.1%} ({correct}/{total})")
    print(f"Total accuracy: {result.accuracy:.1%} ({result.correct}/{result.correct + result.incorrect})")
    print(
        f"questions with out-of-vocabulary words, skipped: {result.out_of_vocabulary} of {result.questions}"
    )
    return 0


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_prepare(args: argparse.Namespace) -> int:
    from .config import parse_size
    from .core import EmbedServeCoreError, load_tokenizer
    from .core.prepare_engines import prepare_engine
    from .core.prepared import progress_reporter
    from .core.storage import open_storage

    if not args.data_dir:
        print("embedserve prepare: name the data folder (--data-dir or EMBEDSERVE_DATA_DIR)", file=sys.stderr)
        return 2
    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError as error:
        print(f"embedserve prepare: --shard-size: {error}", file=sys.stderr)
        return 2
    try:
        bpe_dir = Path(args.bpe_dir) if args.bpe_dir else None
        tokenizer = load_tokenizer(args.tokenizer, bpe_dir, os.environ)
        storage = open_storage(args.data_dir)
        engine = prepare_engine(args.engine, ray_address=args.ray_address)
        manifest = engine.prepare(
            args.inputs,
            args.out,
            storage,
            tokenizer,
            text_column=args.text_column,
            threads=args.threads,
            progress=progress_reporter(f"prepare {args.out}", _print_progress),
            shard_bytes=shard_bytes,
            append=args.append,
        )
    except EmbedServeCoreError as error:
        print(f"embedserve prepare: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {manifest.token_count:,} tokens from {manifest.documents:,} documents in "
        f"{len(manifest.shards)} shards; manifest {storage.url_of(args.out + '.json')}"
        + (f" (generation {manifest.generation})" if manifest.generation > 1 else "")
    )
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from .core import EmbedServeCoreError, load_tokenizer
    from .core.prepared import progress_reporter
    from .core.shard_writer import shard_folder
    from .core.storage import open_storage
    from .core.token_imports import import_corpus

    if not args.data_dir:
        print("embedserve import: name the data folder (--data-dir or EMBEDSERVE_DATA_DIR)", file=sys.stderr)
        return 2
    try:
        bpe_dir = Path(args.bpe_dir) if args.bpe_dir else None
        tokenizer = load_tokenizer(args.tokenizer, bpe_dir, os.environ)
        storage = open_storage(args.data_dir)
        manifest = import_corpus(
            args.format,
            args.inputs,
            args.out,
            storage,
            tokenizer,
            copy=args.copy,
            progress=progress_reporter(f"import {args.out}", _print_progress),
        )
    except EmbedServeCoreError as error:
        print(f"embedserve import: {error}", file=sys.stderr)
        return 1
    copied = sum(shard.file.startswith(shard_folder(args.out) + "/") for shard in manifest.shards)
    print(
        f"{args.out}: {manifest.token_count:,} {manifest.dtype} tokens, {manifest.documents:,} documents "
        f"in {len(manifest.shards)} shards of {args.format} files ({copied} copied, "
        f"{len(manifest.shards) - copied} in place); manifest {storage.url_of(args.out + '.json')}"
    )
    return 0


def _run_prepare_vectors(args: argparse.Namespace) -> int:
    import torch

    from .core.vector_sources import default_cache_dir, load_word_vectors

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(os.environ)
    model = load_word_vectors(args.spec, cache_dir=cache_dir, device=torch.device("cpu"))
    if model is not None:
        print(f"{args.spec}: {model.vocab_size} x {model.dim} ready in {cache_dir}")
    return 0


def _add_server_path(
    parser: argparse.ArgumentParser, name: str, environ: Mapping[str, str], help_text: str
) -> None:
    """A folder flag another command shares with `serve`: its flag and variable ("" when unset)."""
    (flag,) = (flag for flag in serve_flags() if flag.name == name)
    parser.add_argument(
        flag.flag, default=environ.get(flag.variable, ""), help=f"{help_text}; env {flag.variable}"
    )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    from embedserve.client import BatchSpec  # the `batches` command's flags are its fields

    parser = argparse.ArgumentParser(
        prog="embedserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    serve = commands.add_parser("serve", help="run the gRPC server")
    add_server_arguments(serve, environ)
    handlers["serve"] = _run_serve

    tokenize = commands.add_parser("tokenize", help="print the GPT-2 token IDs of a text")
    tokenize.add_argument("text")
    tokenize.add_argument("--allow-special", action="store_true", help="encode <|endoftext|> as its token")
    handlers["tokenize"] = _run_tokenize

    batches = commands.add_parser(
        "batches", help="stream sliding-window batches; print shapes and the first batch"
    )
    source = batches.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="local text file, sent inline")
    source.add_argument("--corpus", help="corpus name in the server's --data-dir")
    BatchSpec.add_arguments(batches)  # one flag per BatchSpec field
    handlers["batches"] = _run_batches

    embed = commands.add_parser("embed", help="print the input embeddings of token IDs")
    embed.add_argument("ids", nargs="+", type=int, metavar="ID")
    embed.add_argument("--offset", type=int, default=0, help="position of the first token")
    embed.add_argument("--no-positional", action="store_true", help="token embeddings only")
    handlers["embed"] = _run_embed

    commands.add_parser("info", help="print the server's model and limits")
    handlers["info"] = _run_info
    health = commands.add_parser(
        "health",
        help="gRPC health check: exit 0 when SERVING (no API key needed; default target: "
        "127.0.0.1 at EMBEDSERVE_HEALTH_PORT, else EMBEDSERVE_TARGET, else EMBEDSERVE_PORT)",
    )
    health.add_argument("--service", default="", help="a service name, e.g. embedserve.v1.WordVectorsService")
    handlers["health"] = _run_health

    similar = commands.add_parser("similar", help="most similar words (king woman --negative man)")
    similar.add_argument("words", nargs="+", metavar="WORD", help="positive words")
    similar.add_argument("--negative", nargs="*", default=[], metavar="WORD", help="negative words")
    similar.add_argument("-n", type=int, default=10, help="how many (default 10)")
    similar.add_argument("--restrict-vocab", type=int, default=None, help="search only the first N words")
    similar.add_argument(
        "--cosmul", action="store_true", help="3CosMul (most_similar_cosmul) instead of 3CosAdd"
    )
    handlers["similar"] = _run_similar

    similarity = commands.add_parser("similarity", help="cosine similarity and distances of two words")
    similarity.add_argument("first")
    similarity.add_argument("second")
    handlers["similarity"] = _run_similarity

    analogies = commands.add_parser("analogies", help="analogy accuracy (gensim evaluate_word_analogies)")
    analogies.add_argument("--file", help="questions file (default: gensim's questions-words.txt)")
    analogies.add_argument("--restrict-vocab", type=int, default=300000)
    handlers["analogies"] = _run_analogies

    prepare = commands.add_parser(
        "prepare-vectors", help="convert word vectors into the cache now (the server then starts fast)"
    )
    prepare.add_argument("spec", help="as --word-vectors: glove-6b-50d, a gensim-data name or a file")
    _add_server_path(
        prepare, "cache_dir", environ, "as the server's --cache-dir (default: ~/.cache/embedserve)"
    )
    handlers["prepare-vectors"] = _run_prepare_vectors

    corpus = commands.add_parser(
        "prepare",
        help="tokenize text, JSON lines, Parquet or Arrow files into a prepared corpus that "
        "StreamBatches serves memory-mapped",
        description="Each plain-text file is one document, each line of a .jsonl file one (its text "
        "column), each non-null row of a .parquet, .arrow/.feather (Arrow IPC file or stream) file "
        "or datasets save_to_disk folder one (its text column); .gz of text or .jsonl is read too, "
        "and a quoted glob ('shards/*.parquet') names its matches in sorted order. Documents are "
        "joined with <|endoftext|>. Writes the shards NAME.shards/*.tokens (uint16 token IDs, uint32 "
        "for a vocabulary past 65,536; at most --shard-size each) and the manifest NAME.json into the "
        "data folder or object-storage URL, using every core (or a Ray cluster: --engine ray).",
    )
    corpus.add_argument(
        "inputs",
        nargs="+",
        help="text, .jsonl (and .gz), .parquet, .arrow/.feather files, globs, save_to_disk folders",
    )
    corpus.add_argument("--out", required=True, help="the corpus name, as StreamBatches requests it")
    _add_server_path(corpus, "data_dir", environ, "the server's data folder or object-storage URL")
    corpus.add_argument(
        "--text-column",
        "--text-field",
        dest="text_column",
        default="text",
        help="the text column of Parquet and Arrow files, and the text field of .jsonl records "
        "(default: text; --text-field is the same flag)",
    )
    corpus.add_argument("--threads", type=int, default=0, help="tokenizer threads (default: every core)")
    corpus.add_argument(
        "--shard-size",
        default=environ.get("EMBEDSERVE_SHARD_SIZE", "256MiB"),
        metavar="SIZE",
        help="most bytes of one shard file (default 256MiB; env EMBEDSERVE_SHARD_SIZE)",
    )
    corpus.add_argument(
        "--append",
        action="store_true",
        help="add the inputs' documents after those of the existing corpus NAME, in new shards",
    )
    corpus.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=environ.get("EMBEDSERVE_PREPARE_ENGINE", "local"),
        help="local: threads of this process (default); ray: Ray Data tasks on a Ray cluster "
        "(embedserve[ray]); env EMBEDSERVE_PREPARE_ENGINE",
    )
    corpus.add_argument(
        "--ray-address",
        default=environ.get("RAY_ADDRESS", ""),
        help="the Ray cluster for --engine ray (default: RAY_ADDRESS, else a local Ray instance)",
    )
    _add_server_path(corpus, "tokenizer", environ, "the encoding, as the server's --tokenizer (default gpt2)")
    _add_server_path(corpus, "bpe_dir", environ, "as the server's --bpe-dir")
    handlers["prepare"] = _run_prepare

    imported = commands.add_parser(
        "import",
        help="serve token files of nanoGPT, llm.c or Megatron-LM (or an old single-file corpus) as they are",
        description="Makes the corpus NAME of existing token files, in order, without "
        "re-tokenizing: nanogpt (train.bin: uint16, no header), llmc (llm.c shards: 256 x int32 "
        "header), megatron (PREFIX.bin + PREFIX.idx; name the prefix, the .bin or the .idx), "
        "embedserve (a format-1 NAME.json sidecar of `embedserve prepare` before shards). A file "
        "inside the local data folder is referenced where it is; others are copied into "
        "NAME.shards/. Every token is checked against the tokenizer's vocabulary.",
    )
    imported.add_argument("format", choices=("nanogpt", "llmc", "megatron", "embedserve"))
    imported.add_argument("inputs", nargs="+", metavar="FILE", help="the token files, in corpus order")
    imported.add_argument("--out", required=True, help="the corpus name, as StreamBatches requests it")
    _add_server_path(imported, "data_dir", environ, "the server's data folder or object-storage URL")
    imported.add_argument(
        "--copy", action="store_true", help="copy files into NAME.shards/ even when inside the data folder"
    )
    _add_server_path(imported, "tokenizer", environ, "the encoding the files were made with (default gpt2)")
    _add_server_path(imported, "bpe_dir", environ, "as the server's --bpe-dir")
    handlers["import"] = _run_import

    for name in ("tokenize", "batches", "embed", "info", "health", "similar", "similarity", "analogies"):
        _add_client_arguments(commands.choices[name], environ)
    health.set_defaults(target=_health_target(environ), health_port_target=_health_port_target(environ))
    for action in health._actions:
        if action.dest == "target":
            action.help = (
                f"server address (default: {_health_target(environ)}: 127.0.0.1 at "
                "EMBEDSERVE_HEALTH_PORT, else EMBEDSERVE_TARGET, else 127.0.0.1 at EMBEDSERVE_PORT)"
            )
    parser.set_defaults(handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from embedserve.client import EmbedServeError

    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        return int(args.handlers[args.command](args))
    except EmbedServeError as exc:
        print(f"embedserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"embedserve {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
