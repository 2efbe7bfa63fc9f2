"""Training data: byte-level corpora and token arrays, split across workers, with a held-out set.

Sources (``DataConfig.paths``):

- nothing: the default corpus, the ``.py`` files of the Python standard library of the running
  interpreter (present on every machine; no downloads);
- text files and folders (searched recursively; files containing NUL bytes are skipped as
  binary): byte-level tokens, vocabulary 256;
- one token array file: ``.npy`` (uint8 or uint16), or raw ``.bin`` (uint16 by default, the
  common convention; ``token_dtype="uint8"`` for byte arrays).

Byte corpora are made of documents (files) joined with a NUL byte (token 0). A deterministic
share of the documents (chosen by a hash of their name and the seed, independent of the worker
count) is held out for evaluation. The rest is split across workers:

- non-IID (default): by top-level package (the first path component under the root), so each
  worker sees different code. A package larger than a fair share of the corpus is split into
  its sub-packages (recursively) only when it exceeds 1.5x a fair share (the stdlib's ``test``
  package is half of it), so that workers get comparable amounts of data; packages are
  dealt largest-first to the worker with the fewest bytes.
- IID: documents shuffled by the seed and dealt to the worker with the fewest bytes.

A token array is cut into blocks of ``block_tokens`` that play the role of documents; non-IID
gives each worker a contiguous run of blocks.

``TokenStream`` yields batches of windows [batch, seq_len + 1]; its position is a small
``state_dict()`` so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DOC_SEPARATOR = 0  # token between documents of a byte corpus (NUL never occurs in text files)
BYTE_VOCAB = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules"}


class DataError(ValueError):
    """A data source that cannot be used, with the reason."""


@dataclass
class DataConfig:
    paths: Sequence[str] = ()          # empty: the Python standard library's .py files
    iid: bool = False
    seed: int = 0
    eval_fraction: float = 0.02        # share of documents (or blocks) held out
    token_dtype: str | None = None     # for .bin token arrays: "uint8" or "uint16" (default)
    block_tokens: int = 1 << 16        # token arrays: block size that stands in for a document
    extensions: Sequence[str] = field(default_factory=lambda: (".py",))  # default corpus only

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = (str(self.paths),)
        self.paths = tuple(str(p) for p in self.paths)
        if not 0.0 < self.eval_fraction < 0.5:
            raise DataError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")
        if self.token_dtype not in (None, "uint8", "uint16"):
            raise DataError(f"token_dtype must be uint8 or uint16, got {self.token_dtype!r}")
        if self.block_tokens < 2:
            raise DataError("block_tokens must be >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paths"], d["extensions"] = list(self.paths), list(self.extensions)
        return d


@dataclass(frozen=True)
class Document:
    """A unit of data: a file (byte corpora) or a block of a token array."""

    name: str                 # unique, stable (relative path or block index)
    group: tuple[str, ...]    # package path used by the non-IID split
    size: int                 # tokens
    source: str               # file to read
    offset: int = 0           # token arrays: first token of the block


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _hash01(*parts) -> float:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


def _walk_files(root: Path, extensions: Sequence[str] | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if extensions is None or name.endswith(tuple(extensions)):
                found.append(Path(dirpath) / name)
    return found


def _text_documents(roots: Sequence[Path], extensions: Sequence[str] | None) -> list[Document]:
    docs = []
    multi = len(roots) > 1
    for root in roots:
        if root.is_dir():
            files = _walk_files(root, extensions)
            for f in files:
                rel = f.relative_to(root).parts
                prefix = (root.name,) if multi else ()
                group = prefix + rel[:-1] + (Path(rel[-1]).stem,)
                docs.append(Document("/".join(prefix + rel), group, f.stat().st_size, str(f)))
        elif root.is_file():
            docs.append(Document(root.name if not multi else str(root), (root.stem,), root.stat().st_size, str(root)))
        else:
            raise DataError(f"--data path {str(root)!r} does not exist")
    docs = [d for d in docs if d.size > 0]
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise DataError("two data paths share file names; pass distinct folders")
    return docs


class Corpus:
    """All documents of a data source and its deterministic split into workers and eval."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.array: np.ndarray | None = None
        paths = [Path(p).expanduser() for p in cfg.paths]
        if not paths:
            root = stdlib_root()
            if not root.is_dir():
                raise DataError(f"the Python standard library was not found at {root}; pass --data")
            self.description = f"Python standard library sources ({root})"
            self.documents = _text_documents([root], cfg.extensions)
            self.vocab_size = BYTE_VOCAB
        elif len(paths) == 1 and paths[0].suffix in (".npy", ".bin"):
            self._load_array(paths[0])
        else:
            for p in paths:
                if p.suffix in (".npy", ".bin"):
                    raise DataError(f"a token array ({p}) must be the only --data source")
            self.description = "text files: " + ", ".join(str(p) for p in paths)
            self.documents = [d for d in _text_documents(paths, None) if not _looks_binary(d.source)]
            self.vocab_size = BYTE_VOCAB
        if not self.documents:
            raise DataError(f"no usable documents in {self.description}")
        self.total_tokens = sum(d.size for d in self.documents)

    def _load_array(self, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"token array {str(path)!r} does not exist")
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r")
            if array.ndim != 1 or array.dtype not in (np.uint8, np.uint16):
                raise DataError(f"{path}: a token array must be 1-D uint8 or uint16, got {array.ndim}-D {array.dtype}")
        else:
            dtype = np.dtype(self.cfg.token_dtype or "uint16")
            if path.stat().st_size % dtype.itemsize:
                raise DataError(f"{path}: size {path.stat().st_size} bytes is not a multiple of {dtype} "
                                f"({dtype.itemsize} bytes); pass the right --data-dtype")
            array = np.memmap(path, dtype=dtype, mode="r")
        if array.size < 2:
            raise DataError(f"{path}: token array has fewer than 2 tokens")
        self.array = array
        self.vocab_size = BYTE_VOCAB if array.dtype == np.uint8 else int(array.max()) + 1
        self.description = f"token array {path} ({array.size} tokens, {array.dtype})"
        n_blocks = -(-array.size // self.cfg.block_tokens)
        width = len(str(n_blocks))
        self.documents = []
        for b in range(n_blocks):
            start = b * self.cfg.block_tokens
            size = min(self.cfg.block_tokens, array.size - start)
            # Non-IID for arrays = contiguous runs: one group, split by the sub-level (block order).
            self.documents.append(Document(f"block{b:0{width}d}", ("array", f"{b:0{width}d}"), size, str(path), start))

    # ---- the split ---------------------------------------------------------------------------

    def eval_documents(self) -> list[Document]:
        held = [d for d in self.documents if _hash01("eval", self.cfg.seed, d.name) < self.cfg.eval_fraction]
        if not held:  # tiny corpora: hold out the document that hashes lowest
            held = [min(self.documents, key=lambda d: _hash01("eval", self.cfg.seed, d.name))]
        if len(held) == len(self.documents):
            raise DataError("the corpus has a single document; nothing left to train on")
        return held

    def train_documents(self) -> list[Document]:
        held = {d.name for d in self.eval_documents()}
        return [d for d in self.documents if d.name not in held]

    def split(self, num_workers: int) -> list[list[Document]]:
        """Training documents of each worker: disjoint, together all training documents."""
        if num_workers < 1:
            raise DataError(f"num_workers must be >= 1, got {num_workers}")
        docs = self.train_documents()
        if self.cfg.iid:
            order = sorted(docs, key=lambda d: _hash01("iid", self.cfg.seed, d.name))
            bundles = [[d] for d in order]
        elif self.array is not None:
            # Contiguous runs of blocks: cut the ordered blocks into num_workers runs of equal size.
            bundles = _contiguous_runs(docs, num_workers)
        else:
            bundles = _package_bundles(docs, num_workers)
            bundles.sort(key=lambda b: (-sum(d.size for d in b), b[0].name))
        shards: list[list[Document]] = [[] for _ in range(num_workers)]
        loads = [0] * num_workers
        for bundle in bundles:
            w = min(range(num_workers), key=lambda i: (loads[i], i))
            shards[w].extend(bundle)
            loads[w] += sum(d.size for d in bundle)
        if not self.cfg.iid:
            # Which worker gets which packages depends on the seed, not on the balancing order.
            perm = sorted(range(num_workers), key=lambda i: _hash01("shard", self.cfg.seed, i))
            shards = [shards[i] for i in perm]
        for w, shard in enumerate(shards):
            if not shard:
                raise DataError(f"{self.description}: worker {w} of {num_workers} gets no training data "
                                f"({len(docs)} training documents); use fewer workers or more data")
        return [sorted(s, key=lambda d: d.name) for s in shards]

    def read(self, docs: Sequence[Document]) -> np.ndarray:
        """The documents' tokens concatenated (byte corpora: NUL-separated)."""
        if self.array is not None:
            parts = [np.asarray(self.array[d.offset:d.offset + d.size]) for d in docs]
            return np.concatenate(parts).astype(self.array.dtype, copy=False)
        parts = []
        for d in docs:
            parts.append(np.frombuffer(Path(d.source).read_bytes(), dtype=np.uint8))
            parts.append(np.array([DOC_SEPARATOR], dtype=np.uint8))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.cfg.to_dict(), self.vocab_size)).encode())
        for d in self.documents:
            h.update(f"{d.name}:{d.size}:{d.offset};".encode())
        return h.hexdigest()[:16]


    def identity(self, shards: Sequence[Sequence[Document]]) -> dict:
        """What every worker of a run must agree on about its data, field by field, so that a
        mismatch is reported by name (``comm.agree``: ``data.tokens=...``) rather than as two
        different hashes: the split settings, the vocabulary, the corpus's and the held-out
        split's size, every worker's shard (documents, tokens) and a hash of the documents'
        names and sizes. The paths are left out: the same data may live at different paths
        on different machines."""
        content = hashlib.sha256()
        for d in self.documents:
            content.update(f"{d.name}:{d.size}:{d.offset};".encode())
        settings = self.cfg.to_dict()
        del settings["paths"]
        held = self.eval_documents()
        return {"settings": settings, "vocab_size": self.vocab_size, "documents": len(self.documents),
                "tokens": self.total_tokens, "eval_documents": len(held),
                "shards": [[len(s), sum(d.size for d in s)] for s in shards], "content": content.hexdigest()[:16]}


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _package_bundles(docs: list[Document], num_workers: int) -> list[list[Document]]:
    """Documents grouped by top-level package; packages over a fair share split one level down."""
    fair = sum(d.size for d in docs) / num_workers
    bundles, pending = [], [((), docs)]
    while pending:
        prefix, members = pending.pop()
        depth = len(prefix)
        groups: dict[tuple, list[Document]] = {}
        for d in members:
            groups.setdefault(d.group[:depth + 1], []).append(d)
        for key in sorted(groups):
            group = groups[key]
            splittable = any(len(d.group) > depth + 1 for d in group)
            if sum(d.size for d in group) > 1.5 * fair and splittable and len(group) > 1:
                pending.append((key, group))
            else:
                bundles.append(group)
    return bundles


def _contiguous_runs(docs: list[Document], num_workers: int) -> list[list[Document]]:
    total = sum(d.size for d in docs)
    runs: list[list[Document]] = [[] for _ in range(num_workers)]
    seen = 0
    for d in docs:  # already in array order
        runs[min(num_workers - 1, int(seen * num_workers / total))].append(d)
        seen += d.size
    return [r for r in runs if r]


class TokenStream:
    """Batches of random windows [batch, seq_len + 1] over one worker's tokens, resumable.

    Each epoch cuts the tokens into non-overlapping windows from a random start offset and
    visits them in a random order; both derive from (seed, rank, epoch), so the stream is
    deterministic and its position is just (epoch, index).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        if tokens.size < seq_len + 1:
            raise DataError(f"worker {rank}'s data has {tokens.size} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len, fewer workers or more data")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank = seed, rank
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.rank, epoch, 0x5eed])
        window = self.seq_len + 1
        start = int(rng.integers(0, min(window, self.tokens.size - window + 1)))
        starts = np.arange(start, self.tokens.size - window + 1, window)
        return starts[rng.permutation(starts.size)]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_batch(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):
            if self.index >= self._order.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            s = int(self._order[self.index])
            rows.append(self.tokens[s:s + self.seq_len + 1])
            self.index += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rank": self.rank,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "num_tokens": int(self.tokens.size)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "seq_len", "batch_size", "num_tokens"):
            if state.get(key) != mine[key]:
                raise DataError(f"data position from a different stream: {key} is {state.get(key)} in the "
                                f"checkpoint, {mine[key]} here")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[torch.Tensor]:
    """A fixed set of windows spread evenly over the held-out tokens (the same on every call)."""
    window = seq_len + 1
    if tokens.size < window:
        raise DataError(f"the held-out split has {tokens.size} tokens, fewer than one window of {window}")
    n = min(num_batches * batch_size, tokens.size // window)
    starts = np.linspace(0, tokens.size - window, n).astype(np.int64)
    rows = np.stack([tokens[s:s + window] for s in starts]).astype(np.int64)
    return [torch.from_numpy(rows[i:i + batch_size]) for i in range(0, n, batch_size)]


@dataclass
class WorkerData:
    train: TokenStream
    eval_tokens: np.ndarray
    vocab_size: int
    description: str
    fingerprint: str
    shard_documents: int
    shard_tokens: int
    identity: dict    # Corpus.identity: what every worker must agree on about the data


def load_worker_data(cfg: DataConfig, rank: int, world_size: int, seq_len: int, batch_size: int) -> WorkerData:
    """Everything worker ``rank`` of ``world_size`` needs: its training stream and the eval tokens."""
    corpus = Corpus(cfg)
    shards = corpus.split(world_size)
    shard = shards[rank]
    tokens = corpus.read(shard)
    stream = TokenStream(tokens, seq_len, batch_size, seed=cfg.seed, rank=rank)
    return WorkerData(train=stream, eval_tokens=corpus.read(corpus.eval_documents()), vocab_size=corpus.vocab_size,
                      description=corpus.description, fingerprint=corpus.fingerprint(),
                      shard_documents=len(shard), shard_tokens=int(tokens.size), identity=corpus.identity(shards))
