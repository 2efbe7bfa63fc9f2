"""Checkpoints: exact resume after a kill, torn/corrupt detection with fallback, export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import federation_workers as fw
from fomoe import checkpoint, launch
from fomoe.checkpoint import CheckpointError
from fomoe.placement import Placement
from fomoe.sync import SyncManager

# ---- one process -------------------------------------------------------------------------------------


def test_nested_state_round_trips_through_the_shard_format():
    model = fw.make_model(None, 0)
    opt = fw.inner_optimizer(model)
    model.loss(fw.batch_for(0, 0)).backward()
    opt.step()
    state = {"opt": opt.state_dict(), "t": (1, 2.5, None, "x", True), "nested": [{"a": torch.arange(3)}],
             "scalar": torch.tensor(7.0, dtype=torch.float64)}
    tensors = {}
    skel = checkpoint._flatten(state, "", tensors)
    json.dumps(skel)
    back = checkpoint._unflatten(json.loads(json.dumps(skel)), tensors.__getitem__)
    assert back["t"] == state["t"] and torch.equal(back["nested"][0]["a"], torch.arange(3))
    assert back["scalar"].dtype == torch.float64
    assert set(back["opt"]["state"]) == set(state["opt"]["state"])   # int keys stay ints
    for k, v in state["opt"]["state"].items():
        for name, t in v.items():
            assert torch.equal(back["opt"]["state"][k][name], t)
    with pytest.raises(CheckpointError, match="cannot checkpoint a set"):
        checkpoint._flatten({"bad": {1, 2}}, "", {})


def _single(tmp_path, steps=(1, 2, 3), config=None):
    model = fw.make_model(None, 0)
    opt = fw.inner_optimizer(model)
    mgr = SyncManager(model, opt, method="diloco", sync_every=2)
    for step in range(max(steps)):
        model.loss(fw.batch_for(0, step)).backward()
        mgr.step()
        if step + 1 in steps:
            checkpoint.save(tmp_path, step + 1, model=model, sync_manager=mgr, inner_optimizer=opt,
                            extra_state={"next_step": step + 1}, config=config or {"a": 1}, keep=None)
    return model, opt, mgr


def _fresh():
    model = fw.make_model(None, 0)
    opt = fw.inner_optimizer(model)
    return model, opt, SyncManager(model, opt, method="diloco", sync_every=2)


def _load(tmp_path, **kw):
    model, opt, mgr = _fresh()
    return checkpoint.load(tmp_path, model=model, sync_manager=mgr, inner_optimizer=opt, **kw), model, mgr


def test_torn_and_corrupt_shards_are_detected_and_skipped(tmp_path, capsys):
    model, _, mgr = _single(tmp_path)
    assert checkpoint.list_checkpoints(tmp_path) == [1, 2, 3] and checkpoint.latest_step(tmp_path) == 3
    info, loaded, lmgr = _load(tmp_path)
    assert info["step"] == 3 and info["extra_state"] == {"next_step": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert lmgr.inner_step == 3 and lmgr.round == 1

    root = checkpoint.checkpoints_dir(tmp_path)
    shard3 = root / "step-00000003" / "rank-00000.safetensors"
    shard3.write_bytes(shard3.read_bytes()[:-100])                       # torn write
    info, *_ = _load(tmp_path)
    assert info["step"] == 2 and "is torn" in capsys.readouterr().err

    shard2 = root / "step-00000002" / "rank-00000.safetensors"
    data = bytearray(shard2.read_bytes())
    data[len(data) // 2] ^= 0x40                                         # silent bit flip
    shard2.write_bytes(bytes(data))
    info, *_ = _load(tmp_path)
    assert info["step"] == 1 and "is corrupt" in capsys.readouterr().err

    (root / "step-00000001" / "manifest.json").unlink()                  # never completed
    with pytest.raises(CheckpointError, match="no usable checkpoint.*torn.*corrupt.*no manifest"):
        _load(tmp_path)


def test_a_crash_before_the_manifest_leaves_the_previous_checkpoint_latest(tmp_path):
    _single(tmp_path, steps=(2,))
    root = checkpoint.checkpoints_dir(tmp_path)
    half = root / "step-00000004"
    half.mkdir()
    (half / ".rank-00000.safetensors.tmp-123").write_bytes(b"partial")
    assert checkpoint.latest_step(tmp_path) == 2
    info, *_ = _load(tmp_path)
    assert info["step"] == 2


def _edit_manifest(path, **changes) -> None:
    """Rewrite a manifest as a save with other settings would have written it (with a matching
    checksum where manifests carry one)."""
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    if "manifest_sha256" in manifest:
        del manifest["manifest_sha256"]
        manifest["manifest_sha256"] = checkpoint._manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_mismatched_configuration_or_world_size_is_refused(tmp_path):
    _single(tmp_path, steps=(2,), config={"lr": 1})
    with pytest.raises(CheckpointError, match="different configuration"):
        _load(tmp_path, config={"lr": 2})
    _edit_manifest(checkpoint.checkpoints_dir(tmp_path) / "step-00000002" / "manifest.json", world_size=2)
    with pytest.raises(CheckpointError, match="written by 2 workers; this run has 1"):
        _load(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint of step 5"):
        _load(tmp_path, step=5)


def test_keep_prunes_old_checkpoints(tmp_path):
    model = fw.make_model(None, 0)
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, model=model, keep=2)
    assert checkpoint.list_checkpoints(tmp_path) == [4, 5]


# ---- real workers: kill and resume ---------------------------------------------------------------------

PLACEMENT = Placement.replicated(3, 3, 2, 2)
SYNC = {"weighted": True, "compression": "int8"}   # resume must carry token counts and residuals too


def _resume_runs(ctx, ref_dir, run_dir, torn_dir):
    uninterrupted = fw.checkpointed_run(ctx, ref_dir, PLACEMENT, 7, **SYNC)
    resumed = fw.checkpointed_run(ctx, run_dir, PLACEMENT, 7, save_at=(7,), resume=True, **SYNC)
    fallback = fw.checkpointed_run(ctx, torn_dir, PLACEMENT, 7, resume=True, **SYNC)
    return uninterrupted, resumed, fallback


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    run_dir, torn_dir, ref_dir = base / "run", base / "torn", base / "ref"
    # Checkpoints in the middle of outer rounds (H=2), then every worker is SIGKILLed.
    with pytest.raises(launch.WorkerError) as killed:
        launch.spawn(_killed_run, 3, backend="gloo", timeout_s=180, args=(str(run_dir),))
    shutil.copytree(run_dir, torn_dir)
    shard = checkpoint.checkpoints_dir(torn_dir) / "step-00000005" / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    out = launch.spawn(_resume_runs, 3, backend="gloo", timeout_s=180, args=(str(ref_dir), str(run_dir),
                                                                            str(torn_dir)))
    return killed.value, out, run_dir


def _killed_run(ctx, run_dir):
    return fw.checkpointed_run(ctx, run_dir, PLACEMENT, 7, save_at=(3, 5), kill_after=5, **SYNC)


def test_workers_were_really_killed(resumed):
    killed, _, run_dir = resumed
    assert sorted(killed.failures) == [0, 1, 2]
    assert all("exited with code -9" in msg for msg in killed.failures.values())
    assert checkpoint.list_checkpoints(run_dir) == [3, 5, 7]


def test_resume_continues_bitwise_identically(resumed):
    _, out, _ = resumed
    for rank, (ref, res, _) in enumerate(out):
        ref_losses, ref_state, ref_theta, _ = ref
        losses, state, theta, start = res
        assert start == 5
        assert {s: ref_losses[s] for s in losses} == losses, f"rank {rank}: loss trajectory differs after resume"
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), f"rank {rank}: {k}"
        for k in ref_theta:
            assert torch.equal(theta[k], ref_theta[k]), f"rank {rank}: θ_global {k}"


def test_a_corrupt_shard_on_one_worker_sends_every_worker_back_to_the_same_checkpoint(resumed):
    _, out, _ = resumed
    for rank, (ref, _, fallback) in enumerate(out):
        losses, state, _, start = fallback
        assert start == 3, f"rank {rank} resumed from {start}"
        assert {s: ref[0][s] for s in losses} == losses
        for k in ref[1]:
            assert torch.equal(state[k], ref[1][k])


def test_export_consolidates_every_expert_into_a_full_model(resumed, tmp_path):
    _, out, run_dir = resumed
    info = checkpoint.export_full_model(run_dir, tmp_path / "full.safetensors")
    assert info["step"] == 7 and info["experts"] == 2 * 3
    from safetensors.torch import load_file
    full = fw.TinyMoENet(None, num_experts=3, layers=2)
    full.load_state_dict(load_file(str(tmp_path / "full.safetensors")), strict=True)
    exported = full.state_dict()
    for rank, (_, res, _) in enumerate(out):
        theta = res[2]
        for k, v in theta.items():
            assert torch.equal(exported[k], v), f"{k} from rank {rank}"
    holders_seen = {k for _, res, _ in out for k in res[2] if ".experts." in k}
    assert len(holders_seen) == 2 * 3 * 2   # every expert of both layers (w13 and w2)


# ---- a full disk while saving ------------------------------------------------------------------------

def _trained(steps: int):
    model, opt, mgr = _fresh()
    for step in range(steps):
        model.loss(fw.batch_for(0, step)).backward()
        mgr.step()
    return model, opt, mgr


def _snapshot(model, mgr) -> dict:
    state = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"theta/{k}": v.clone() for k, v in mgr.global_state().items()})
    return state


def _assert_bitwise(model, mgr, snapshot) -> None:
    now = _snapshot(model, mgr)
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), k


def _save(run_dir, step, model, opt, mgr):
    return checkpoint.save(run_dir, step, model=model, sync_manager=mgr, inner_optimizer=opt,
                           extra_state={"next_step": step}, config={"a": 1}, keep=2)


def _leftovers(run_dir) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in checkpoint.checkpoints_dir(run_dir).rglob("*")
                  if ".tmp-" in p.name or p.name == "step-00000004")


def _check_disk_full_failure(run_dir, exc_info, good_snapshot) -> None:
    """The failed save of step 4 said what happened, and step 2 is still the checkpoint in every way."""
    message = str(exc_info.value)
    assert "checkpoint of step 4 failed" in message and "No space left on device" in message, message
    assert "the previous checkpoint (step 2) is intact" in message, message
    assert checkpoint.latest_step(run_dir) == 2 and checkpoint.list_checkpoints(run_dir) == [2]
    assert _leftovers(run_dir) == []
    info, model, mgr = _load(run_dir, config={"a": 1})
    assert info["step"] == 2 and info["extra_state"] == {"next_step": 2}
    _assert_bitwise(model, mgr, good_snapshot)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for a few of these checkpoints, and a real ENOSPC when it is full."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                                 text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: the fault-injected full-disk tests cover this without one")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN; the fault-injected "
                    f"full-disk tests cover this without it): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path) -> int:
    """Write zeros to ``path`` until the filesystem is full; returns the bytes written."""
    import errno
    written = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(bytes(16 * 1024))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        try:
            while f.write(bytes(512)):   # the last partial page
                written += 512
        except OSError:
            pass
    return written


def test_a_full_disk_during_save_leaves_the_last_good_checkpoint(small_disk):
    run_dir = small_disk / "run"
    model, opt, mgr = _trained(2)
    _save(run_dir, 2, model, opt, mgr)
    good = _snapshot(model, mgr)
    for step in range(2, 4):
        model.loss(fw.batch_for(0, step)).backward()
        mgr.step()
    assert _fill(small_disk / "filler") > 0
    with pytest.raises(CheckpointError) as failed:
        _save(run_dir, 4, model, opt, mgr)
    _check_disk_full_failure(run_dir, failed, good)

    (small_disk / "filler").unlink()   # space again: the next save works and is the newest
    later = _snapshot(model, mgr)
    _save(run_dir, 4, model, opt, mgr)
    assert checkpoint.latest_step(run_dir) == 4 and checkpoint.list_checkpoints(run_dir) == [2, 4]
    info, loaded, lmgr = _load(run_dir, config={"a": 1})
    assert info["step"] == 4
    _assert_bitwise(loaded, lmgr, later)


class _FullHalfway:
    """A file whose disk fills half-way through the first write: half the bytes land, then ENOSPC."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        import errno
        self.f.write(bytes(data)[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full_on(target: str, rank: int | None = None):
    """An ``open`` for fomoe.checkpoint under which writing ``target`` (a file name prefix) fails
    part-way with ENOSPC (on ``rank``'s shard only, when a rank is given)."""
    import builtins
    import os as _os

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        name = _os.path.basename(str(path))
        if "w" in mode and name.startswith(f".{target}") and (rank is None or f"rank-{rank:05d}" in name):
            return _FullHalfway(f)
        return f
    return fake_open


@pytest.mark.parametrize("target", ["rank-", "manifest.json", "latest"])
def test_a_write_cut_short_by_a_full_disk_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, target):
    model, opt, mgr = _trained(2)
    _save(tmp_path, 2, model, opt, mgr)
    good = _snapshot(model, mgr)
    model.loss(fw.batch_for(0, 2)).backward()
    mgr.step()
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "open", _disk_full_on(target), raising=False)
        with pytest.raises(CheckpointError) as failed:
            _save(tmp_path, 4, model, opt, mgr)
    _check_disk_full_failure(tmp_path, failed, good)
    _save(tmp_path, 4, model, opt, mgr)
    assert checkpoint.latest_step(tmp_path) == 4


def test_a_full_disk_at_fsync_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    # Filesystems with delayed allocation report a full disk only when the data is flushed.
    import errno
    import os as _os
    model, opt, mgr = _trained(2)
    _save(tmp_path, 2, model, opt, mgr)
    good = _snapshot(model, mgr)
    real_fsync = _os.fsync

    def fsync(fd):
        if ".tmp-" in _os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    with monkeypatch.context() as m:
        m.setattr(_os, "fsync", fsync)
        with pytest.raises(CheckpointError) as failed:
            _save(tmp_path, 4, model, opt, mgr)
    _check_disk_full_failure(tmp_path, failed, good)


def _disk_full_workers(ctx, run_dir):
    """Three workers save step 2; step 4 fails on one worker's disk (rank 1's shard, then the
    manifest on rank 0); every worker must fail and resume from step 2; then step 4 succeeds."""
    model = fw.make_model(PLACEMENT, ctx.rank)
    opt = fw.inner_optimizer(model)
    mgr = SyncManager(model, opt, method="fomoe", sync_every=2, placement=PLACEMENT, rank=ctx.rank,
                      world_size=ctx.world_size)

    def save(step):
        return checkpoint.save(run_dir, step, model=model, sync_manager=mgr, inner_optimizer=opt, keep=None,
                               extra_state={"next_step": step}, config={"a": 1}, rank=ctx.rank,
                               world_size=ctx.world_size)
    for step in range(4):
        model.loss(fw.batch_for(ctx.rank, step)).backward()
        mgr.step()
        if step == 1:
            save(2)
            good = _snapshot(model, mgr)
    failures = {}
    for case, (target, on_rank) in {"shard": ("rank-", 1), "manifest": ("manifest.json", 0)}.items():
        original = getattr(checkpoint, "open", None)
        if ctx.rank == on_rank:
            checkpoint.open = _disk_full_on(target, rank=1 if target == "rank-" else None)
        try:
            save(4)
            failures[case] = None
        except CheckpointError as exc:
            failures[case] = str(exc)
        finally:
            if original is None:
                checkpoint.__dict__.pop("open", None)
            else:
                checkpoint.open = original
        failures[case + "/latest"] = (checkpoint.latest_step(run_dir), checkpoint.list_checkpoints(run_dir))
    fresh = fw.make_model(PLACEMENT, ctx.rank)
    fopt = fw.inner_optimizer(fresh)
    fmgr = SyncManager(fresh, fopt, method="fomoe", sync_every=2, placement=PLACEMENT, rank=ctx.rank,
                       world_size=ctx.world_size)
    info = checkpoint.load(run_dir, model=fresh, sync_manager=fmgr, inner_optimizer=fopt, rank=ctx.rank,
                           world_size=ctx.world_size, config={"a": 1})
    _assert_bitwise(fresh, fmgr, good)
    save(4)
    return failures, info["step"], checkpoint.latest_step(run_dir)


def test_one_workers_full_disk_fails_the_save_on_every_worker(tmp_path):
    out = launch.spawn(_disk_full_workers, 3, backend="gloo", timeout_s=120, args=(str(tmp_path),))
    for rank, (failures, resumed_from, latest_after) in enumerate(out):
        shard = failures["shard"]
        assert shard is not None, f"rank {rank} saved although rank 1's disk was full"
        assert "rank 1 could not write its shard" in shard and "No space left on device" in shard, shard
        assert "the previous checkpoint (step 2) is intact" in shard
        manifest = failures["manifest"]
        assert manifest is not None and "could not write the manifest" in manifest, manifest
        assert "the previous checkpoint (step 2) is intact" in manifest
        assert failures["shard/latest"] == failures["manifest/latest"] == (2, [2])
        assert resumed_from == 2 and latest_after == 4
    assert _leftovers(tmp_path) == ["checkpoints/step-00000004"]   # the successful save, nothing else


@pytest.mark.parametrize("field", ["step", "config_hash"])
def test_a_flipped_bit_in_a_manifest_is_detected(tmp_path, capsys, field):
    _single(tmp_path, steps=(1, 2, 3))
    path = checkpoint.checkpoints_dir(tmp_path) / "step-00000003" / "manifest.json"
    text = path.read_text()
    start = text.index(f'"{field}": ') + len(f'"{field}": ') + (1 if field == "config_hash" else 0)
    data = bytearray(text.encode())
    data[start] ^= 0x04                       # "3" -> "7", or one hex digit of the hash
    path.write_bytes(bytes(data))
    assert json.loads(data)[field] != json.loads(text)[field]
    info, *_ = _load(tmp_path, config={"a": 1})
    assert info["step"] == 2 and "step-00000003" in capsys.readouterr().err
