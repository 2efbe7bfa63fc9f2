"""Starting workers: a local spawner for one machine and ``init_from_env`` for torchrun.

Every worker gets torch.distributed initialised with a finite timeout, so a worker that dies
or a configuration that makes workers wait for each other ends in an error on every worker
instead of a hang. Backend choice (``backend="auto"``): NCCL when every local worker can have
its own GPU, gloo otherwise; the environment variable ``FOMOE_BACKEND`` (gloo | nccl)
overrides it.

``spawn(fn, world_size, args=...)`` runs ``fn(ctx, *args)`` in ``world_size`` fresh
processes (``ctx`` is this worker's ``DistContext``) and returns their return values in rank
order; if any worker fails, it raises ``WorkerError`` carrying every worker's error (or, with
``tolerate_failures=True``, returns a ``Failed`` in that worker's place and lets the others
finish: for runs that survive the loss of workers). The rendezvous store of spawned workers
lives in the launching process, so the loss of any worker, rank 0 included, leaves it intact.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistContext:
    """Who this worker is and where its tensors live."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Failed:
    """In ``spawn(..., tolerate_failures=True)``'s results: a worker that did not return."""

    rank: int
    error: str
    exitcode: int | None = None


class WorkerError(RuntimeError):
    """One or more spawned workers failed; ``failures`` maps rank -> that worker's traceback."""

    def __init__(self, failures: dict[int, str], world_size: int) -> None:
        self.failures = failures
        ranks = sorted(failures)
        first = failures[ranks[0]].strip().splitlines()
        summary = first[-1] if first else "unknown error"
        details = "\n".join(f"--- rank {r} ---\n{failures[r].rstrip()}" for r in ranks)
        super().__init__(f"{len(ranks)} of {world_size} workers failed (ranks {ranks}); rank {ranks[0]}: "
                         f"{summary}\n{details}")


def choose_backend(backend: str = "auto", local_world_size: int = 1) -> str:
    """'nccl' if every local worker can have its own GPU, else 'gloo'; FOMOE_BACKEND overrides 'auto'."""
    if backend == "auto":
        backend = os.environ.get("FOMOE_BACKEND", "auto").strip().lower() or "auto"
    if backend == "auto":
        ok = torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size
        return "nccl" if ok else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be auto, gloo or nccl; got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs, and none is visible; use gloo")
        if torch.cuda.device_count() < local_world_size:
            raise ValueError(f"backend 'nccl' needs one GPU per local worker: {local_world_size} workers, "
                             f"{torch.cuda.device_count()} GPUs; use gloo or fewer workers")
    return backend


def _init(rank: int, world_size: int, local_rank: int, local_world_size: int, backend: str,
          timeout_s: float, store=None) -> DistContext:
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world_size, local_rank, local_world_size, backend, device)


def init_from_env(backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without RANK: a single worker, no process group."""
    if "RANK" not in os.environ:
        chosen = choose_backend(backend, 1)
        device = torch.device("cuda", 0) if chosen == "nccl" else torch.device("cpu")
        return DistContext(0, 1, 0, 1, chosen, device)
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    except (KeyError, ValueError) as exc:
        raise RuntimeError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"{var} is not set; launch with torchrun or fomoe.launch.spawn")
    return _init(rank, world_size, local_rank, local_world, choose_backend(backend, local_world), timeout_s)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, backend: str, port: int, timeout_s: float, threads: int,
            args: Sequence, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        ctx = _init(rank, world_size, rank, world_size, backend, timeout_s, store)
        out = fn(ctx, *args)
        # Plain pickle: tensors travel by value (multiprocessing would share them through file
        # descriptors that vanish when this process exits).
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 (report anything, including KeyboardInterrupt, to the parent)
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 (best effort on the way out; a peer may be gone already)
                pass


def _context(start_method: str | None, backend: str):
    # CPU workers: forkserver (where available): torch and fomoe are imported once by the server
    # and every worker is a fork of it, so starting workers costs milliseconds instead of a torch
    # import each (torch._dynamo too: every optimizer constructor imports it). GPU workers: fresh
    # interpreters (spawn), so no worker can inherit CUDA state from a server process.
    if start_method is None:
        forkserver = "forkserver" in mp.get_all_start_methods() and backend == "gloo"
        start_method = "forkserver" if forkserver else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.optim", "torch._dynamo", "fomoe", "fomoe.sync"])
    return ctx


def spawn(fn: Callable[..., Any], world_size: int, backend: str = "auto", args: Sequence = (),
          timeout_s: float = DEFAULT_TIMEOUT_S, threads_per_worker: int | None = None,
          grace_s: float = 30.0, start_method: str | None = None, tolerate_failures: bool = False,
          on_start: Callable[[list], None] | None = None) -> list[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` local worker processes; their results in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s`` bounds every
    collective (torch.distributed's timeout) and the whole run. When a worker fails, the others
    get ``grace_s`` seconds to finish or fail on their own (a bad configuration fails on every
    worker) before they are terminated; then ``WorkerError`` reports every failure.
    ``start_method``: multiprocessing start method (default: forkserver for gloo workers where
    available, spawn otherwise). ``tolerate_failures``: a failed worker does not stop the others;
    its place in the results holds a ``Failed``. ``on_start(processes)``: called once every
    worker process has started (fault-injection experiments use it to find their pids).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    backend = choose_backend(backend, world_size)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context(start_method, backend)
    results = ctx.Queue()
    # The rendezvous store lives here, not in rank 0: losing any worker leaves it intact.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    port = store.port
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, backend, port, timeout_s, threads, tuple(args),
                                               results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    if on_start is not None:
        on_start(procs)
    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    first_failure_at = None
    try:
        while len(outputs) + len(failures) < world_size:
            now = time.monotonic()
            if now > deadline:
                for r in range(world_size):
                    if r not in outputs and r not in failures:
                        failures[r] = f"timed out after {timeout_s:.0f} s without finishing"
                break
            if first_failure_at is not None and not tolerate_failures and now > first_failure_at + grace_s:
                for r in range(world_size):
                    if r not in outputs and r not in failures:
                        failures[r] = (f"terminated {grace_s:.0f} s after rank {min(failures)} failed "
                                       f"(it was probably waiting for that worker)")
                break
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in outputs and r not in failures and p.exitcode is not None:
                        # Exited without reporting: killed (e.g. out of memory) or crashed hard.
                        time.sleep(0.5)
                        if results.empty():
                            failures[r] = f"worker process exited with code {p.exitcode} without reporting"
                            first_failure_at = first_failure_at or time.monotonic()
                continue
            if ok:
                outputs[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                first_failure_at = first_failure_at or time.monotonic()
    finally:
        for p in procs:
            if p.is_alive() and ((failures and not tolerate_failures) or time.monotonic() > deadline):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    del store
    if tolerate_failures:
        return [outputs[r] if r in outputs else Failed(r, failures.get(r, "unknown"), procs[r].exitcode)
                for r in range(world_size)]
    if failures:
        raise WorkerError(failures, world_size)
    return [outputs[r] for r in range(world_size)]
