"""fomoe.data: corpus discovery, worker sharding, held-out split and the resumable stream."""

import numpy as np
import pytest

from fomoe.data import (DOC_SEPARATOR, Corpus, DataConfig, DataError, TokenStream, eval_batches, load_worker_data,
                        stdlib_root)


def make_tree(root, packages=4, files=5, size=300):
    for p in range(packages):
        for f in range(files):
            path = root / f"pkg{p}" / ("sub" if f % 2 else "") / f"mod{f}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes([97 + p]) * (size + 17 * f))
    return root


def test_default_corpus_is_the_stdlib():
    corpus = Corpus(DataConfig())
    names = {d.name for d in corpus.documents}
    assert "os.py" in names and "json/decoder.py" in names
    assert not any("site-packages" in n for n in names)
    assert corpus.vocab_size == 256
    assert corpus.total_tokens == sum((stdlib_root() / n).stat().st_size for n in names)


@pytest.mark.parametrize("iid", [False, True])
def test_split_is_disjoint_complete_and_deterministic(iid):
    corpus = Corpus(DataConfig(iid=iid, seed=3))
    shards = corpus.split(4)
    names = [[d.name for d in s] for s in shards]
    flat = [n for s in names for n in s]
    assert len(flat) == len(set(flat))                       # disjoint
    held = {d.name for d in corpus.eval_documents()}
    assert not held & set(flat)                              # eval held out
    assert set(flat) | held == {d.name for d in corpus.documents}
    assert names == [[d.name for d in s] for s in Corpus(DataConfig(iid=iid, seed=3)).split(4)]
    assert names != [[d.name for d in s] for s in Corpus(DataConfig(iid=iid, seed=4)).split(4)]
    sizes = [sum(d.size for d in s) for s in shards]
    assert max(sizes) < 1.3 * min(sizes)                     # balanced enough to train


def test_non_iid_keeps_packages_together(tmp_path):
    make_tree(tmp_path)
    corpus = Corpus(DataConfig(paths=[str(tmp_path)], eval_fraction=0.01))
    shards = corpus.split(4)
    owner = {}
    for w, shard in enumerate(shards):
        for d in shard:
            owner.setdefault(d.group[0], set()).add(w)
    assert all(len(ws) == 1 for ws in owner.values()), owner
    iid = Corpus(DataConfig(paths=[str(tmp_path)], eval_fraction=0.01, iid=True)).split(4)
    spread = {d.group[0] for d in iid[0]}
    assert len(spread) > 1


def test_eval_split_does_not_depend_on_workers_or_iid():
    a = Corpus(DataConfig(seed=1))
    b = Corpus(DataConfig(seed=1, iid=True))
    assert [d.name for d in a.eval_documents()] == [d.name for d in b.eval_documents()]
    assert 0.005 < sum(d.size for d in a.eval_documents()) / a.total_tokens < 0.06


def test_text_files_are_bytes_with_separators(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "b.txt").write_bytes(b"world!")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01binary")
    corpus = Corpus(DataConfig(paths=[str(tmp_path)], eval_fraction=0.3))
    assert {d.name for d in corpus.documents} == {"a.txt", "b.txt"}
    tokens = corpus.read(corpus.documents)
    assert bytes(tokens).split(bytes([DOC_SEPARATOR])) == [b"hello", b"world!", b""]


def test_token_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, 50_000).astype(np.uint16)
    np.save(tmp_path / "t.npy", arr)
    arr.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        corpus = Corpus(DataConfig(paths=[str(tmp_path / name)], block_tokens=1000, eval_fraction=0.1))
        assert corpus.vocab_size == int(arr.max()) + 1
        shards = corpus.split(3)
        # Non-IID arrays: each worker a contiguous run of blocks.
        for shard in shards:
            idx = [int(d.name[5:]) for d in shard]
            train_idx = sorted(int(d.name[5:]) for d in corpus.train_documents())
            pos = [train_idx.index(i) for i in idx]
            assert pos == list(range(pos[0], pos[0] + len(pos)))
        tokens = np.concatenate([corpus.read(s) for s in shards] + [corpus.read(corpus.eval_documents())])
        assert np.array_equal(np.sort(tokens), np.sort(arr))
    arr8 = rng.integers(0, 256, 5000).astype(np.uint8)
    arr8.tofile(tmp_path / "b8.bin")
    corpus = Corpus(DataConfig(paths=[str(tmp_path / "b8.bin")], token_dtype="uint8", block_tokens=500))
    assert corpus.vocab_size == 256 and corpus.total_tokens == 5000
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="multiple"):
        Corpus(DataConfig(paths=[str(tmp_path / "odd.bin")]))


def test_stream_is_deterministic_and_resumes_exactly():
    tokens = np.arange(10_000, dtype=np.uint16) % 251
    a = TokenStream(tokens, seq_len=16, batch_size=8, seed=1, rank=2)
    first = [a.next_batch() for _ in range(50)]   # crosses epoch boundaries (10000 / 17 / 8 = 73 batches per epoch)
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(60)]
    b = TokenStream(tokens, seq_len=16, batch_size=8, seed=1, rank=2)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, [b.next_batch() for _ in range(60)]))
    c = TokenStream(tokens, seq_len=16, batch_size=8, seed=1, rank=2)
    assert all(np.array_equal(x, c.next_batch()) for x in first)
    batch = first[0]
    assert batch.shape == (8, 17)
    # Windows are contiguous runs of the worker's tokens.
    assert all(((row[1:] - row[:-1]) % 251 == 1).all() for row in batch.numpy())
    other = TokenStream(tokens, seq_len=16, batch_size=8, seed=1, rank=3)
    with pytest.raises(DataError, match="rank"):
        other.load_state_dict(state)


def test_eval_batches_and_worker_data():
    wd = load_worker_data(DataConfig(seed=0), rank=1, world_size=3, seq_len=32, batch_size=4)
    batches = eval_batches(wd.eval_tokens, 32, 4, 5)
    assert len(batches) == 5 and batches[0].shape == (4, 33)
    again = eval_batches(wd.eval_tokens, 32, 4, 5)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    assert wd.train.next_batch().max() < 256


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Corpus(DataConfig(paths=[str(tmp_path / "nope")]))
    (tmp_path / "one.txt").write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="single document"):
        Corpus(DataConfig(paths=[str(tmp_path / "one.txt")])).split(1)
    make_tree(tmp_path / "few", packages=1, files=2)
    with pytest.raises(DataError, match="gets no training data"):
        Corpus(DataConfig(paths=[str(tmp_path / "few")], eval_fraction=0.01)).split(5)
    with pytest.raises(DataError, match="fewer than one window"):
        TokenStream(np.zeros(10, np.uint8), seq_len=16, batch_size=2)


def test_identity_names_what_differs_and_ignores_where_the_data_lives(tmp_path):
    from fomoe.comm import _differences
    here, there = make_tree(tmp_path / "site_a"), make_tree(tmp_path / "site_b")
    a = load_worker_data(DataConfig(paths=[str(here)], eval_fraction=0.1), 0, 2, seq_len=16, batch_size=2)
    b = load_worker_data(DataConfig(paths=[str(there)], eval_fraction=0.1), 1, 2, seq_len=16, batch_size=2)
    assert a.identity == b.identity                      # same data at another path, seen by another rank
    assert a.identity["tokens"] == a.shard_tokens + b.shard_tokens + a.eval_tokens.size - a.identity["documents"]
    assert [s[1] for s in a.identity["shards"]] == [a.shard_tokens - a.shard_documents,
                                                   b.shard_tokens - b.shard_documents]

    (there / "pkg1" / "mod0.txt").write_bytes(b"b" * 1000)   # one file differs at one site
    c = load_worker_data(DataConfig(paths=[str(there)], eval_fraction=0.1), 1, 2, seq_len=16, batch_size=2)
    diff = {path: (mine, ref) for path, mine, ref in _differences(c.identity, a.identity)}
    assert diff["tokens"] == (a.identity["tokens"] + 700, a.identity["tokens"])
    assert "content" in diff and "documents" not in diff

    d = load_worker_data(DataConfig(paths=[str(here)], eval_fraction=0.1, seed=5), 0, 2, seq_len=16, batch_size=2)
    assert ("settings.seed", 5, 0) in _differences(d.identity, a.identity)
