"""Checkpoints of a federated run: one safetensors shard per worker plus a manifest.

Layout under ``run_dir/checkpoints/``::

    step-00000120/
        rank-00000.safetensors   every tensor of worker 0 (model, θ_global, outer momenta,
        rank-00001.safetensors   inner optimizer state, extra state, RNG); the metadata holds
        ...                      the structure around them as JSON
        manifest.json            written last: step, world size, config hash, placement, sync
                                 configuration, and every shard's size and sha256
    latest                       name of the newest complete checkpoint

Atomicity: every file is written to a temporary name, fsynced, then renamed; each worker's
shard checksum (or its write error) reaches the lowest live rank (rank 0 unless it was lost)
through the control plane (``comm.gather_live``), which writes the manifest only after every
shard is in place, then moves ``latest``. A checkpoint without a manifest is incomplete and
ignored; a crash at any moment leaves the previous checkpoint as the latest. A write that fails
on any worker (a full disk, a quota) fails ``save`` on every worker with ``CheckpointError``:
the unfinished step directory is removed and ``latest`` still names the previous checkpoint.

After workers were lost (a run over the fault-tolerant TCP transport), the survivors' shards
form the checkpoint and the manifest lists the ``lost_ranks``; such a checkpoint resumes only
the ranks whose shards it holds (``load`` falls back to the newest checkpoint every loading
worker holds), and exports when every expert has a holder among them.

``load`` verifies the sha256 of its shard; a torn or corrupted checkpoint is reported and the
workers fall back together to the newest checkpoint that every worker verified. On CPU a
resumed run continues bitwise identically (model, θ_global, outer and inner optimizer state,
error-feedback residuals, the round's token counts, RNG state, and the caller's extra state
such as the data position).

``run_dir`` must be on a filesystem every worker writes to and rank 0 can read (one machine,
or a shared filesystem across nodes): rank 0 writes the manifest for all shards.

``export_full_model`` merges every expert from all shards (by the per-expert state_dict keys)
into one state dict that loads into a model holding every expert.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

FORMAT = "fomoe-checkpoint-1"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found, verified or applied, with the reason."""


class CheckpointSkipped(CheckpointError):
    """A worker was lost while the checkpoint was being committed: it was not written (the
    previous one stays the latest); training can go on and save the next one."""


# ---- nested state <-> (JSON skeleton, flat tensors) ----------------------------------------------

def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj``; its tensors go to ``tensors`` under path-like keys."""
    if isinstance(obj, torch.Tensor):
        key = path
        # safetensors refuses tensors sharing memory: store an owned, contiguous CPU copy.
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key, "device": str(obj.device)}
    if isinstance(obj, dict):
        keys = list(obj)
        if all(isinstance(k, str) for k in keys):
            return {"__dict__": {k: _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        # Optimizer state dicts use int keys: keep them typed.
        return {"__items__": [[_flatten(k, f"{path}/#k{i}", tensors), _flatten(v, f"{path}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a {type(obj).__name__} at {path!r}: only tensors, dicts, lists, "
                          f"tuples, numbers, strings and None are supported")


def _unflatten(skel: Any, tensors, device_map: str | torch.device | None = None) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            t = tensors(skel["__tensor__"])
            return t if device_map is None else t.to(device_map)
        if "__dict__" in skel:
            return {k: _unflatten(v, tensors, device_map) for k, v in skel["__dict__"].items()}
        if "__items__" in skel:
            return {_unflatten(k, tensors, device_map): _unflatten(v, tensors, device_map) for k, v in skel["__items__"]}
        if "__tuple__" in skel:
            return tuple(_unflatten(v, tensors, device_map) for v in skel["__tuple__"])
        raise CheckpointError(f"unknown entry in checkpoint structure: {sorted(skel)}")
    if isinstance(skel, list):
        return [_unflatten(v, tensors, device_map) for v in skel]
    return skel


# ---- files -----------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename; returns its sha256.
    On failure (e.g. a full disk) the temporary file is removed and ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


# ---- save ------------------------------------------------------------------------------------------

def save(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, sync_manager=None,
         inner_optimizer: torch.optim.Optimizer | None = None, extra_state: dict | None = None,
         config: dict | None = None, rank: int = 0, world_size: int = 1, keep: int | None = 3,
         gather=None) -> Path:
    """Every worker calls this at the same step; returns the checkpoint's directory.

    ``extra_state``: anything else the run needs to continue exactly (data position, counters):
    nested dicts/lists of tensors, numbers and strings. ``config``: the run's configuration;
    its hash goes into the manifest. ``keep``: complete checkpoints to keep (older ones are
    deleted by rank 0 after the new one is complete; None keeps all). ``gather(tag, text)``:
    the exchange between workers (default ``comm.gather_live``); over a fault-tolerant run,
    ``SyncManager.exchange``, which returns None when a worker loss interrupted it after
    others completed it: then nothing is committed and every worker raises
    ``CheckpointSkipped``.
    """
    from . import comm
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = checkpoints_dir(run_dir)
    step_dir = root / _step_name(step)

    try:
        step_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "rng": _rng_state(), "extra": extra_state or {}}
        if sync_manager is not None:
            state["sync"] = sync_manager.state_dict()
        if inner_optimizer is not None:
            state["inner_optimizer"] = inner_optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, "", tensors)
        header = {"format": FORMAT, "step": step, "rank": rank, "world_size": world_size, "state": skeleton}
        data = st_save(tensors, metadata={"fomoe": json.dumps(header)})
        shard = step_dir / _shard_name(rank)
        mine = {"file": shard.name, "sha256": _write_atomic(shard, data), "bytes": len(data)}
    except OSError as exc:
        mine = {"error": f"rank {rank} could not write its shard to {step_dir}: {exc}"}

    gather = gather or comm.gather_live
    got = gather(f"ckpt-{step}", json.dumps(mine)) if world_size > 1 else {"0": json.dumps(mine)}
    skipped = got is None
    shards = {int(r): json.loads(t) for r, t in (got or {}).items()}
    # The lowest rank taking part writes the manifest: rank 0 unless it was lost (a rank lost
    # before the exchange is not waited for).
    writer = min(shards) if shards else None
    errors = [s["error"] for _, s in sorted(shards.items()) if "error" in s]
    outcome = "ok"
    if skipped:
        outcome = f"rank {rank} missed the commit of step {step} (a worker was lost meanwhile)"
    elif rank == writer:
        try:
            if errors:
                # Nothing of this step is usable: remove it so it cannot be mistaken for a checkpoint.
                if not (step_dir / "manifest.json").exists():
                    shutil.rmtree(step_dir, ignore_errors=True)
            else:
                manifest = {"format": FORMAT, "step": step, "world_size": world_size, "created": time.time(),
                            "config": config, "config_hash": config_hash(config or {}),
                            "placement": sync_manager.placement.to_dict() if sync_manager is not None else None,
                            "sync": sync_manager.config_summary() if sync_manager is not None else None,
                            "shards": {str(r): s for r, s in sorted(shards.items())}}
                lost = sorted(set(range(world_size)) - set(shards))
                if lost:
                    manifest["lost_ranks"] = lost
                manifest["manifest_sha256"] = _manifest_digest(manifest)
                _write_atomic(step_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
                _write_atomic(root / "latest", (step_dir.name + "\n").encode())
                if keep is not None:
                    _prune(root, keep, protect=step_dir.name)
        except OSError as exc:
            outcome = f"rank {rank} could not write the manifest of {step_dir}: {exc}"
            try:
                (step_dir / "manifest.json").unlink()
            except OSError:
                pass
            shutil.rmtree(step_dir, ignore_errors=True)
    if world_size > 1:
        # Nobody returns before the manifest exists: a worker killed right after save() returns
        # cannot leave the others' next load() without this checkpoint.
        done = gather(f"ckpt-done-{step}", outcome)
        if done is None:
            skipped = True
        else:
            # The writer's outcome decides for everyone (a rank that missed the first exchange
            # does not know who wrote: the lowest rank taking part now).
            done = {int(r): t for r, t in done.items()}
            w = writer if shards else min(done)
            outcome = done.get(w, f"rank {w} (the writer) was lost")
            skipped = outcome.startswith(f"rank {w} missed the commit")
    if skipped:
        previous = latest_step(run_dir)
        raise CheckpointSkipped(f"checkpoint of step {step} skipped: a worker was lost while it was committed; the "
                                f"latest checkpoint is " + (f"step {previous}" if previous is not None else "none"))
    if errors or outcome != "ok":
        previous = latest_step(run_dir)
        raise CheckpointError("checkpoint of step {} failed: {}; the previous checkpoint ({}) is intact".format(
            step, "; ".join(errors) if errors else outcome,
            f"step {previous}" if previous is not None else "none written yet"))
    return step_dir


def _prune(root: Path, keep: int, protect: str) -> None:
    complete = [d for d in _step_dirs(root) if (d / "manifest.json").exists()]
    for d in complete[:-keep]:
        if d.name != protect:
            shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---- find and verify -------------------------------------------------------------------------------

def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _STEP_DIR.match(d.name))]
    return [d for _, d in sorted(found)]


def read_manifest(step_dir: Path) -> dict:
    path = step_dir / "manifest.json"
    if not path.exists():
        raise CheckpointError(f"{step_dir} is incomplete: it has no manifest (the run stopped while writing it)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fomoe checkpoint manifest (format {manifest.get('format')!r})")
    expected = manifest.pop("manifest_sha256", None)
    if expected is not None and expected != _manifest_digest(manifest):
        raise CheckpointError(f"{path} is corrupt: its content does not match its checksum")
    return manifest


def _manifest_digest(manifest: dict) -> str:
    # Canonical JSON: the digest does not depend on how the file was written out.
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_shard(step_dir: Path, rank: int, manifest: dict | None = None) -> Path:
    """Raise ``CheckpointError`` unless ``rank``'s shard is present and matches the manifest's checksum."""
    manifest = manifest or read_manifest(step_dir)
    entry = manifest["shards"].get(str(rank))
    if entry is None:
        raise CheckpointError(f"{step_dir} has no shard for rank {rank} (it was written by "
                              f"{manifest['world_size']} workers)")
    path = step_dir / entry["file"]
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path} is torn: {size} bytes, the manifest says {entry['bytes']}")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupt: sha256 {digest[:16]}…, the manifest says {entry['sha256'][:16]}…")
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints (with a manifest), oldest first. Not verified."""
    return [int(_STEP_DIR.match(d.name).group(1)) for d in _step_dirs(checkpoints_dir(run_dir))
            if (d / "manifest.json").exists()]


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Step named by the ``latest`` pointer (None before the first complete checkpoint). Not verified."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if pointer.exists():
        m = _STEP_DIR.match(pointer.read_text().strip())
        if m:
            return int(m.group(1))
    steps = list_checkpoints(run_dir)
    return steps[-1] if steps else None


def _warn(msg: str) -> None:
    print(f"fomoe.checkpoint: {msg}", file=sys.stderr, flush=True)


# ---- load ------------------------------------------------------------------------------------------

def load(run_dir: str | os.PathLike, *, model: torch.nn.Module, sync_manager=None,
         inner_optimizer: torch.optim.Optimizer | None = None, rank: int = 0, world_size: int = 1,
         step: int | None = None, config: dict | None = None, restore_rng: bool = True) -> dict:
    """Restore worker ``rank`` from the newest checkpoint every worker verifies (or ``step``).

    Every worker calls it together. Returns {"step", "extra_state", "config", "path"}. A torn
    or corrupt checkpoint is reported on stderr and skipped (all workers fall back to the same
    older one); ``CheckpointError`` if none is usable, if the checkpoint was written by a
    different number of workers or placement, or (when ``config`` is given) for another
    configuration.
    """
    root = checkpoints_dir(run_dir)
    dirs = _step_dirs(root)
    if step is not None:
        dirs = [d for d in dirs if d.name == _step_name(step)]
        if not dirs:
            raise CheckpointError(f"no checkpoint of step {step} in {root}")
    problems: dict[str, str] = {}
    good: list[str] = []
    for d in reversed(dirs):
        try:
            manifest = read_manifest(d)
            if manifest["world_size"] != world_size:
                raise CheckpointError(f"{d} was written by {manifest['world_size']} workers; this run has "
                                      f"{world_size}")
            verify_shard(d, rank, manifest)
            good.append(d.name)
        except CheckpointError as exc:
            problems[d.name] = str(exc)
    chosen = _agree_on_checkpoint(good, problems, rank, world_size, root)
    for name in sorted(problems, reverse=True):
        if chosen is None or name > chosen:
            _warn(f"rank {rank}: skipping {problems[name]}")
    if chosen is None:
        raise CheckpointError(f"no usable checkpoint in {root}" + (
            ": " + "; ".join(problems.values()) if problems else " (none written yet)"))
    step_dir = root / chosen
    manifest = read_manifest(step_dir)
    if config is not None and manifest.get("config_hash") != config_hash(config):
        raise CheckpointError(f"{step_dir} was written with a different configuration (config hash "
                              f"{manifest.get('config_hash')}, this run {config_hash(config)})")
    if sync_manager is not None and manifest.get("placement") is not None:
        saved = manifest["placement"]
        from .placement import Placement
        if Placement.from_dict(saved) != sync_manager.placement:
            raise CheckpointError(f"{step_dir} was written with another expert placement "
                                  f"({Placement.from_dict(saved)!r}); this run has {sync_manager.placement!r}")

    path = step_dir / manifest["shards"][str(rank)]["file"]
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["fomoe"])
        state = _unflatten(header["state"], f.get_tensor)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if sync_manager is not None:
        if "sync" not in state:
            raise CheckpointError(f"{path} has no sync manager state")
        try:
            sync_manager.load_state_dict(state["sync"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    if inner_optimizer is not None:
        if "inner_optimizer" not in state:
            raise CheckpointError(f"{path} has no inner optimizer state")
        # Optimizer.load_state_dict moves the state to each parameter's device itself.
        inner_optimizer.load_state_dict(state["inner_optimizer"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return {"step": manifest["step"], "extra_state": state["extra"], "config": manifest.get("config"),
            "path": str(step_dir)}


def _agree_on_checkpoint(good: list[str], problems: dict, rank: int, world_size: int, root: Path) -> str | None:
    """The newest checkpoint every worker verified (names sort by step)."""
    from . import comm
    if world_size == 1:
        return good[0] if good else None
    everyone = [set(json.loads(t)) for t in comm.gather_text("ckpt-load", json.dumps(good))]
    common = set.intersection(*everyone)
    newest_anywhere = max((n for s in everyone for n in s), default=None)
    chosen = max(common) if common else None
    if chosen is not None and newest_anywhere is not None and newest_anywhere > chosen:
        bad = [r for r, s in enumerate(everyone) if newest_anywhere not in s]
        _warn(f"rank {rank}: {newest_anywhere} failed verification on ranks {bad}; all workers resume from {chosen}")
    return chosen


# ---- export ----------------------------------------------------------------------------------------

def _check_every_expert_saved(step_dir: Path, manifest: dict, saved: list[int]) -> None:
    """A checkpoint written after workers were lost holds every expert only if each has a saved holder."""
    from .placement import Placement
    from .sync import orphaned_experts
    if manifest.get("placement") is None:
        return
    orphans = orphaned_experts(Placement.from_dict(manifest["placement"]), saved)
    if orphans:
        raise CheckpointError(f"{step_dir} was written after ranks {manifest['lost_ranks']} were lost and lacks "
                              f"{len(orphans)} experts (e.g. layer {orphans[0][0]} expert {orphans[0][1]})")


def export_full_model(run_dir: str | os.PathLike, out_path: str | os.PathLike, step: int | None = None) -> dict:
    """Consolidate every expert from all shards into one safetensors state dict at ``out_path``.

    Uses the newest checkpoint whose shards all verify (or ``step``). Parameters are the
    federation's global model θ_global of the last outer sync where the run keeps one
    (fomoe, diloco), the workers' parameters otherwise (ddp). Dense parameters come from
    rank 0; each expert from its lowest-ranked holder, after checking that every holder
    stores the same values. Returns {"step", "tensors", "experts", "path"}.
    """
    root = checkpoints_dir(run_dir)
    problems = []
    for d in reversed([d for d in _step_dirs(root) if step is None or d.name == _step_name(step)]):
        try:
            manifest = read_manifest(d)
            saved = sorted(int(r) for r in manifest["shards"])
            if manifest.get("lost_ranks"):
                _check_every_expert_saved(d, manifest, saved)
            paths = [verify_shard(d, r, manifest) for r in saved]
            break
        except CheckpointError as exc:
            problems.append(str(exc))
            _warn(f"export: skipping {exc}")
    else:
        raise CheckpointError(f"no complete, verified checkpoint to export in {root}"
                              + (": " + "; ".join(problems) if problems else ""))
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for r, path in zip(saved, paths):
        with safe_open(str(path), "pt") as f:
            skel = json.loads(f.metadata()["fomoe"])["state"]
            state = _unflatten(skel, f.get_tensor)
        params = dict(state["model"])
        theta = state.get("sync", {}).get("theta_global") or {}
        params.update({k: v for k, v in theta.items() if k in params})
        replicated = set(theta) if theta else set(params)   # identical on every holder by construction
        for key, value in params.items():
            if key not in merged:
                merged[key], owner[key] = value.contiguous(), r
            elif key in replicated and not torch.equal(merged[key], value):
                raise CheckpointError(f"{key} differs between its holders (ranks {owner[key]} and {r}) in {d}; "
                                      f"the checkpoint was not taken at a consistent point")
    experts = sorted({k.rsplit(".", 1)[0] for k in merged if ".experts." in k})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = st_save(merged, metadata={"format": "fomoe-full-model", "step": str(manifest["step"])})
    _write_atomic(out_path, data)
    return {"step": manifest["step"], "tensors": len(merged), "experts": len(experts), "path": str(out_path)}
