"""Byte-level BPE (HF `tokenizers`) and packing text into fixed-length token sequences."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.data.shards import ShardInfo, iter_shard, write_shard

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_bpe_on_shards(entries: list[dict], vocab_size: int, train_bytes: int) -> str:
    """Train on the first `train_bytes` of the text shards (read and checked shard by shard);
    returns the tokenizer as JSON."""

    def texts():
        seen = 0
        for entry in entries:
            for sample in iter_shard(entry["path"], entry):
                if seen < train_bytes:
                    seen += len(sample["txt"].encode("utf-8"))
                    yield sample["txt"]
            if seen >= train_bytes:
                return

    return train_bpe(texts(), vocab_size).to_str()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def pack_sequences(docs: Iterable[list[int]], eot_id: int, length: int) -> Iterator[list[int]]:
    """Concatenate documents, each followed by end-of-text, and cut into `length`-token pieces.

    The remainder shorter than `length` is dropped.
    """
    buffer: list[int] = []
    for ids in docs:
        buffer.extend(ids)
        buffer.append(eot_id)
        while len(buffer) >= length:
            yield buffer[:length]
            buffer = buffer[length:]


@contextmanager
def one_thread():
    """`tokenizers` batch calls on this thread alone, not its Rayon pool of every core: a
    shard task holds one CPU, and N tasks on an N-core node would otherwise run N x N threads.
    The variable is read at each call; restored after, as Ray reuses worker processes."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def tokenize_shard(text_shard: dict, out_path: str, tokenizer_json: str, seq_len: int) -> ShardInfo:
    """One text shard (a manifest entry, checked as read) -> one shard of packed
    (seq_len + 1)-token sequences (inputs and shifted targets). Runs on one CPU."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = token_dtype(tokenizer.get_vocab_size())
    texts = [s["txt"] for s in iter_shard(text_shard["path"], text_shard)]
    with one_thread():
        encoded = [e.ids for e in tokenizer.encode_batch(texts)]
    stem = out_path.rsplit("/", 1)[-1].removesuffix(".tar")
    samples = (
        {"__key__": f"{stem}-{i:06d}", "npy": np.asarray(seq, dtype=dtype)}
        for i, seq in enumerate(pack_sequences(encoded, eot, seq_len + 1))
    )
    return write_shard(out_path, samples)
