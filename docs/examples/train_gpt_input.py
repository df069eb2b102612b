"""Trains a small GPT-style model on batches streamed by an embedserve server, and resumes exactly.

    python docs/examples/train_gpt_input.py --target 127.0.0.1:50051 --corpus books --steps 100 \\
        --checkpoint run.pt        # trains steps 1-100, saving run.pt every --save-every steps
    python docs/examples/train_gpt_input.py --target 127.0.0.1:50051 --corpus books --steps 200 \\
        --checkpoint run.pt        # a later process: continues from run.pt with step 101

The model is the reference notebook's input stage, token embedding + positional embedding
(torch.nn.Embedding each), then one causal transformer block and a linear head to the vocabulary.
Its batches come from `StreamingDataset` through torchdata's `StatefulDataLoader`, whose
`state_dict()` is saved with the model's and the optimizer's, so a resumed run sees exactly the
batches an uninterrupted one would have. Each step prints one JSON line: the step, the epoch, a
digest of the batch and the loss. See docs/training-data.md#pytorch-streamingdataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from embedserve.client.torch import StreamingDataset
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-untyped]

GPT2_VOCAB_SIZE = 50257


class GPTInput(nn.Module):
    """Token + positional embeddings, one causal transformer block, and a head to the vocabulary."""

    def __init__(self, vocab_size: int, context_length: int, dim: int, heads: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(context_length, dim)
        self.block = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        length = token_ids.shape[1]
        positions = torch.arange(length, device=token_ids.device)
        x = self.token_embedding(token_ids) + self.position_embedding(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=token_ids.device)
        x = self.block(x, src_mask=causal, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def batch_digest(inputs: torch.Tensor, targets: torch.Tensor) -> str:
    """A short hash of a batch's token IDs, to compare the batches two runs saw."""
    digest = hashlib.sha256(inputs.numpy().tobytes())
    digest.update(targets.numpy().tobytes())
    return digest.hexdigest()[:16]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="the embedserve server")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help="a corpus in the server's --data-dir")
    source.add_argument("--text", help="the training text itself")
    parser.add_argument("--steps", type=int, required=True, help="train until this many steps in all")
    parser.add_argument("--checkpoint", type=Path, required=True, help="resumed from when it exists")
    parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per window (the context)")
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--seed", type=int, default=123, help="the shuffle's and the model's seed")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    return parser.parse_args(argv)


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save under a temporary name, then a rename: a crash never leaves half a checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    source = {"corpus": args.corpus} if args.corpus is not None else {"text": args.text}
    dataset = StreamingDataset(
        args.target,
        **source,
        batch_size=args.batch_size,
        max_length=args.max_length,
        stride=args.stride,
        seed=args.seed,
    )
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=args.num_workers)
    model = GPTInput(GPT2_VOCAB_SIZE, args.max_length, args.dim, args.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step, epoch = 0, 0
    if args.checkpoint.exists():
        checkpoint = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        loader.load_state_dict(checkpoint["loader"])  # needs the same --num-workers
        step, epoch = checkpoint["step"], checkpoint["epoch"]

    def checkpoint_now() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        save(args.checkpoint, {**state, "loader": loader.state_dict(), "step": step, "epoch": epoch})

    while step < args.steps:
        dataset.set_epoch(epoch)  # before iter(loader): the workers copy it
        for inputs, targets in loader:
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch
            optimizer.step()
            step += 1
            line = {"step": step, "epoch": epoch, "batch": batch_digest(inputs, targets), "loss": loss.item()}
            print(json.dumps(line), flush=True)
            if step % args.save_every == 0 or step == args.steps:
                checkpoint_now()
            if step == args.steps:
                break
        else:
            epoch += 1  # this pass is over: the next one reads the next epoch


if __name__ == "__main__":
    main()
