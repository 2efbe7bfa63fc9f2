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


def test_mismatched_configuration_or_world_size_is_refused(tmp_path):
    _single(tmp_path, steps=(2,), config={"lr": 1})
    with pytest.raises(CheckpointError, match="different configuration"):
        _load(tmp_path, config={"lr": 2})
    manifest_path = checkpoint.checkpoints_dir(tmp_path) / "step-00000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["world_size"] = 2
    manifest_path.write_text(json.dumps(manifest))
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
