"""Transports of the federation: ring all-reduce and ring all-gather among a subset of ranks.

The sync manager sums pseudo-gradients among the holders of each expert (a *holder group*)
with a ring all-reduce run as a point-to-point schedule over the default process group: no
sub-communicators, so any holder set works without creating groups. The schedule itself
(which chunk each rank sends and receives at each step) has one home, ``ring_plan`` /
``allgather_plan``; the transports only execute it:

- ``GlooTransport``: torch.distributed ``isend``/``irecv`` on CPU tensors (any backend's
  default group works; a gloo group is created if the default one is not gloo);
- ``NcclTransport``: the extension's NCCL communicator (``ncclSend``/``ncclRecv`` in groups
  over one communicator bootstrapped through torch.distributed's store) on CUDA tensors;
- ``fomoe.tcp.TcpTransport``: its own authenticated mesh of TCP connections on CPU tensors,
  for runs across sites: it survives the loss of workers (``MembershipChange`` / ``recover``)
  and carries the control plane below once it exists.

Ring all-reduce of ``numel`` elements over ``n`` ranks: the buffer is cut into ``n`` chunks
(sizes differ by at most one element, the larger ones first). Reduce-scatter: at step s
(0 <= s < n-1) the rank at position p sends chunk (p - s) mod n to position p+1 and
accumulates chunk (p - s - 1) mod n received from position p-1; afterwards it owns the fully
reduced chunk (p + 1) mod n. All-gather: at step s it sends chunk (p + 1 - s) mod n and
receives chunk (p - s) mod n, overwriting. Every chunk's final value is computed by exactly
one rank and copied to the others, so every member ends with bitwise-identical results.

Wire formats: fp32 (exact), bf16 (each hop rounds the partial sum to bf16; accumulation in
fp32; the owner rounds the final chunk so every member holds the same values), and int8
(per-block scales; run as an all-gather of every member's quantised payload, summed in rank
order by every member — int8 partial sums cannot be re-quantised hop by hop without drift).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

COMPRESSIONS = (None, "bf16", "int8")
INT8_BLOCK = 256  # elements per int8 scale


# ---- the schedule (one home) ----------------------------------------------------------------

def ring_chunks(numel: int, group_size: int) -> list[tuple[int, int]]:
    """(start, length) of the ring's chunks: sizes differ by at most one, larger ones first."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    base, rem = divmod(numel, group_size)
    chunks, start = [], 0
    for i in range(group_size):
        length = base + (1 if i < rem else 0)
        chunks.append((start, length))
        start += length
    return chunks


@dataclass(frozen=True)
class RingPlan:
    """The ring all-reduce seen from one member: chunks and, per step, which chunk goes where.

    Steps name chunk indices; ``next_position`` receives what this member sends and
    ``prev_position`` sends what it receives.
    """

    group_size: int
    position: int
    chunks: tuple[tuple[int, int], ...]
    reduce_steps: tuple[tuple[int, int], ...]   # (send chunk, recv-and-accumulate chunk)
    gather_steps: tuple[tuple[int, int], ...]   # (send chunk, recv-and-overwrite chunk)
    owned_chunk: int                            # fully reduced here after the reduce-scatter

    @property
    def next_position(self) -> int:
        return (self.position + 1) % self.group_size

    @property
    def prev_position(self) -> int:
        return (self.position - 1) % self.group_size

    def table(self) -> list[list[int]]:
        """The plan as rows of element ranges, as the NCCL transport executes it: one row per
        reduce-scatter step, one per all-gather step, (send start, send len, recv start,
        recv len); a last row (owned start, owned len, 0, 0)."""
        rows = []
        for s, r in self.reduce_steps + self.gather_steps:
            rows.append([*self.chunks[s], *self.chunks[r]])
        rows.append([*self.chunks[self.owned_chunk], 0, 0])
        return rows

    def elements(self) -> tuple[int, int]:
        """(sent, received) elements over the whole all-reduce."""
        steps = self.reduce_steps + self.gather_steps
        return (sum(self.chunks[s][1] for s, _ in steps), sum(self.chunks[r][1] for _, r in steps))


def ring_plan(numel: int, group_size: int, position: int) -> RingPlan:
    if not 0 <= position < group_size:
        raise ValueError(f"position {position} out of range for a group of {group_size}")
    n, p = group_size, position
    reduce_steps = tuple(((p - s) % n, (p - s - 1) % n) for s in range(n - 1))
    gather_steps = tuple(((p + 1 - s) % n, (p - s) % n) for s in range(n - 1))
    return RingPlan(n, p, tuple(ring_chunks(numel, n)), reduce_steps, gather_steps, (p + 1) % n)


def allgather_plan(group_size: int, position: int) -> tuple[tuple[int, int], ...]:
    """Ring all-gather of one payload per member: per step (send slot, receive slot)."""
    n, p = group_size, position
    return tuple(((p - s) % n, (p - s - 1) % n) for s in range(n - 1))


def ring_allreduce_bytes(numel: int, elem_bytes: int, group_size: int, position: int) -> tuple[int, int]:
    """Exact (sent, received) bytes of the ring all-reduce for the member at ``position``."""
    sent, recv = ring_plan(numel, group_size, position).elements()
    return sent * elem_bytes, recv * elem_bytes


def ring_allgather_bytes(payload_bytes: int, group_size: int, position: int) -> tuple[int, int]:
    """Exact (sent, received) bytes of the ring all-gather of equal payloads."""
    if not 0 <= position < group_size:
        raise ValueError(f"position {position} out of range for a group of {group_size}")
    steps = len(allgather_plan(group_size, position))
    return steps * payload_bytes, steps * payload_bytes


def int8_payload_bytes(numel: int) -> int:
    """Bytes of one member's int8 payload: one byte per element plus an fp32 scale per block."""
    return numel + 4 * math.ceil(numel / INT8_BLOCK)


def check_compression(compression: str | None, allow_auto: bool = False) -> str | None:
    """A wire format (None = fp32); with ``allow_auto`` also ``"auto"``, a schedule-level choice
    that ``bucket_compression`` resolves per holder group."""
    if compression in ("none", "fp32"):
        return None
    if compression == "auto" and allow_auto:
        return compression
    if compression not in COMPRESSIONS:
        choices = "none, bf16, int8" + (", auto" if allow_auto else "")
        raise ValueError(f"compression must be one of {choices}; got {compression!r}")
    return compression


def bucket_compression(compression: str | None, group_size: int) -> str | None:
    """The wire format of one holder group's sum. ``"auto"``: whichever of int8 and bf16 sends
    fewer bytes. int8 runs as an all-gather, (n-1) payloads of ~1 byte per element per rank,
    against the bf16 ring's 4(n-1)/n bytes: int8 for groups of up to 3 ranks, bf16 from 4 on
    (where int8 would send more than bf16, and from 9 on more than fp32)."""
    if compression != "auto":
        return compression
    return "int8" if group_size <= 3 else "bf16"


def sum_bytes(numel: int, group_size: int, position: int, compression: str | None = None) -> tuple[int, int]:
    """(sent, received) bytes of ``Transport.sum_`` of ``numel`` fp32 elements with ``compression``."""
    compression = check_compression(compression)
    if group_size == 1 or numel == 0:
        return 0, 0
    if compression == "int8":
        return ring_allgather_bytes(int8_payload_bytes(numel), group_size, position)
    return ring_allreduce_bytes(numel, 2 if compression == "bf16" else 4, group_size, position)


# ---- int8 codec -------------------------------------------------------------------------------

def int8_encode(x: Tensor) -> Tensor:
    """fp32 [N] -> one uint8 payload [int8_payload_bytes(N)]: fp32 block scales, then int8 values."""
    n = x.numel()
    blocks = math.ceil(n / INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = x
    rows = padded.view(blocks, INT8_BLOCK)
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return torch.cat([scale.view(torch.uint8), q.view(torch.uint8)])


def int8_decode(payload: Tensor, numel: int) -> Tensor:
    blocks = math.ceil(numel / INT8_BLOCK)
    scale = payload[:4 * blocks].view(torch.float32)
    q = payload[4 * blocks:4 * blocks + numel].view(torch.int8).to(torch.float32)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=payload.device)
    padded[:numel] = q
    return (padded.view(blocks, INT8_BLOCK) * scale[:, None]).reshape(-1)[:numel]


def compress_roundtrip(x: Tensor, compression: str | None) -> Tensor:
    """What the receiving side reconstructs of a local contribution (for error feedback)."""
    if compression is None:
        return x
    if compression == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    return int8_decode(int8_encode(x), x.numel())


def error_feedback_(buf: Tensor, residual: Tensor | None, compression: str | None) -> Tensor:
    """Adds last round's compression error to ``buf`` (in place) and returns this round's.

    Over many rounds the compressed contributions then sum to the exact ones up to one
    round's error, instead of accumulating a bias.
    """
    if residual is not None:
        buf.add_(residual)
    return buf - compress_roundtrip(buf, compression)


# ---- transports -------------------------------------------------------------------------------

class MembershipChange(RuntimeError):
    """A collective was interrupted because the set of live workers changed (a worker was lost,
    or a restarted one asked to join). ``ranks``: the ranks this worker saw change (may be empty
    when the news came from a peer); ``reasons``: rank -> what was observed."""

    def __init__(self, message: str, ranks=(), reasons: dict | None = None) -> None:
        super().__init__(message)
        self.ranks = tuple(sorted(ranks))
        self.reasons = dict(reasons or {})


class PeerLost(MembershipChange):
    """One or more peers stopped responding or closed their connection."""


class Excluded(RuntimeError):
    """The other workers declared this worker lost (it was silent for longer than their timeout)
    and continue without it; restart it to rejoin the run."""


class QuorumLost(RuntimeError):
    """Fewer than half of the run's workers remain reachable: continuing could split the run
    into independent halves, so this side stops."""


class Transport:
    """Sums a flat fp32 buffer in place among ``ranks`` (global ranks, sorted), every member
    ending with bitwise-identical values; returns the (sent, received) bytes it moved."""

    name = "abstract"
    device_type = "cpu"

    def sum_(self, buf: Tensor, ranks: Sequence[int], compression: str | None = None) -> tuple[int, int]:
        ranks = tuple(ranks)
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not a member of the group {ranks}")
        if buf.dtype != torch.float32 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("Transport.sum_ needs a contiguous 1-D fp32 buffer")
        if self.device_type is not None and buf.device.type != self.device_type:
            raise ValueError(f"{self.name} transport works on {self.device_type} tensors, got one on {buf.device}")
        if len(ranks) == 1 or buf.numel() == 0:
            return 0, 0
        compression = check_compression(compression)
        position = ranks.index(self.rank)
        if compression == "int8":
            return self._allgather_sum_int8(buf, ranks, position)
        wire = torch.bfloat16 if compression == "bf16" else torch.float32
        return self._ring_allreduce(buf, ranks, ring_plan(buf.numel(), len(ranks), position), wire)

    def _allgather_sum_int8(self, buf: Tensor, ranks: tuple[int, ...], position: int) -> tuple[int, int]:
        n, numel = len(ranks), buf.numel()
        size = int8_payload_bytes(numel)
        # Slots padded to 4 bytes keep every payload's fp32 scales aligned; only size bytes move.
        slots = torch.empty((n, -(-size // 4) * 4), dtype=torch.uint8, device=buf.device)[:, :size]
        slots[position] = int8_encode(buf)
        prev, nxt = ranks[(position - 1) % n], ranks[(position + 1) % n]
        sent = recv = 0
        for send_slot, recv_slot in allgather_plan(n, position):
            self._exchange(slots[send_slot], nxt, slots[recv_slot], prev)
            sent, recv = sent + size, recv + size
        # Every member sums the same decoded payloads in rank order: identical results.
        total = int8_decode(slots[0], numel)
        for i in range(1, n):
            total += int8_decode(slots[i], numel)
        buf.copy_(total)
        return sent, recv

    def _ring_allreduce(self, buf: Tensor, ranks, plan: RingPlan, wire: torch.dtype) -> tuple[int, int]:
        """The ring on host tensors through ``_exchange`` (transports with their own kernel override it)."""
        nxt, prev = ranks[plan.next_position], ranks[plan.prev_position]
        chunks = plan.chunks
        elem = torch.empty(0, dtype=wire).element_size()
        tmp = torch.empty(max(length for _, length in chunks), dtype=wire)
        sent = recv = 0
        for send_c, recv_c in plan.reduce_steps:
            (s0, sl), (r0, rl) = chunks[send_c], chunks[recv_c]
            self._exchange(buf[s0:s0 + sl].to(wire), nxt, tmp[:rl], prev)
            buf[r0:r0 + rl] += tmp[:rl].to(torch.float32)
            sent, recv = sent + sl * elem, recv + rl * elem
        # The owner fixes its chunk's final value in the wire format, so all members agree bitwise.
        o0, ol = chunks[plan.owned_chunk]
        final = buf.to(wire)
        buf[o0:o0 + ol] = final[o0:o0 + ol].to(torch.float32)
        for send_c, recv_c in plan.gather_steps:
            (s0, sl), (r0, rl) = chunks[send_c], chunks[recv_c]
            self._exchange(final[s0:s0 + sl], nxt, final[r0:r0 + rl], prev)
            buf[r0:r0 + rl] = final[r0:r0 + rl].to(torch.float32)
            sent, recv = sent + sl * elem, recv + rl * elem
        return sent, recv

    def _exchange(self, send: Tensor, dst: int, recv: Tensor, src: int) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def prepare_groups(self, groups, max_groups: int | None = None) -> None:
        """Set up what the transport keeps per holder group before the first sum. Collective:
        every rank calls it with the same groups in the same order. Nothing by default."""

    # Membership. Transports that survive the loss of a worker (``fault_tolerant``) raise
    # ``MembershipChange`` from a collective when a member is lost or joins, and ``recover()``
    # returns the live ranks every survivor agreed on; the others keep all ranks forever.
    fault_tolerant = False

    def live_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.world_size))

    def recover(self) -> tuple[int, ...]:
        raise RuntimeError(f"the {self.name} transport cannot continue after losing a worker; use the TCP "
                           f"transport (fomoe.tcp.TcpTransport) for runs that must survive failures")


class GlooTransport(Transport):
    """Ring schedules with torch.distributed point-to-point ops on CPU tensors."""

    name = "gloo"
    device_type = "cpu"

    def __init__(self, group=None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("GlooTransport needs torch.distributed initialised (fomoe.launch.spawn or "
                               "fomoe.launch.init_from_env)")
        if group is None:
            group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _exchange(self, send: Tensor, dst: int, recv: Tensor, src: int) -> None:
        # Raw bytes on the wire: gloo moves any dtype, and the byte count is what we count.
        reqs = [dist.isend(send.contiguous().view(torch.uint8), dst, group=self.group),
                dist.irecv(recv.view(torch.uint8), src, group=self.group)]
        for req in reqs:
            req.wait()

    def barrier(self) -> None:
        dist.barrier(group=self.group)


class LoopbackTransport(Transport):
    """A world of one worker: every group is just this rank, nothing moves."""

    name = "loopback"
    device_type = None

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1

    def barrier(self) -> None:
        pass


def default_transport(device: torch.device | str) -> Transport:
    """The transport for buffers on ``device``: NCCL for CUDA, gloo otherwise (none for one worker)."""
    device = torch.device(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return LoopbackTransport()
    if device.type == "cuda":
        return NcclTransport(device)
    if device.type != "cpu":
        raise ValueError(f"no fomoe transport for {device.type} tensors; keep the global copy on cpu or cuda")
    return GlooTransport()


class NcclTransport(Transport):
    """Sums over the extension's NCCL communicators, asynchronously on the current CUDA stream.

    One communicator over all ranks is bootstrapped from a unique id that rank 0 publishes in
    torch.distributed's store. ``prepare_groups`` (every rank, the same groups in the same
    order: the sync schedule's) splits one more per holder group; an fp32 sum among a prepared
    group is then one ``ncclAllReduce`` on it (NCCL reduces while it moves the data). Other
    sums (the bf16 wire, unprepared groups) run the ring schedule as send/recv groups over the
    full communicator, reduce-scatter transfers cut into slices of ``slice_bytes`` (default 32
    MiB, env FOMOE_NCCL_SLICE_MB) so the add of one slice overlaps the transfer of the next.
    Either way the bytes counted are the ring's: 2(n-1)/n of the bucket per member.
    """

    name = "nccl"
    device_type = "cuda"

    def __init__(self, device: torch.device | str | None = None, timeout_s: float | None = None,
                 slice_bytes: int | None = None) -> None:
        ops = nccl_ops()
        if ops is None:
            raise RuntimeError("this fomoe build has no NCCL transport (built without CUDA, or without the comm "
                               "sources); keep θ_global on the CPU (global_device='cpu') to sync through gloo")
        if not dist.is_initialized():
            raise RuntimeError("NcclTransport needs torch.distributed initialised (its store bootstraps NCCL)")
        check_nccl_version()
        from torch.distributed import distributed_c10d as c10d
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        if self.device.type != "cuda":
            raise ValueError(f"NcclTransport needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if timeout_s is None:
            timeout_s = _default_timeout_s()
        mib = float(os.environ.get("FOMOE_NCCL_SLICE_MB", "32"))
        self.slice_elems = max(1, int(slice_bytes if slice_bytes is not None else mib * (1 << 20)) // 4)
        store = c10d._get_default_store()
        _nccl_counter[0] += 1
        key = f"fomoe/nccl-unique-id/{_nccl_counter[0]}"
        if self.rank == 0:
            uid = ops.nccl_unique_id()
            store.set(key, bytes(uid.tolist()))
        else:
            uid = torch.tensor(list(store.get(key)), dtype=torch.uint8)
        self._ops = ops
        self.handle = ops.nccl_init(uid, self.rank, self.world_size, self.device.index, float(timeout_s))
        self._group_handles: dict[tuple[int, ...], int] = {}   # prepared groups this rank belongs to
        self._prepared: set[tuple[int, ...]] = set()
        self.group_allreduce = True   # False: every sum runs the send/recv ring (for comparisons)

    def prepare_groups(self, groups, max_groups: int | None = None) -> None:
        """Split a communicator for each group of two or more ranks not prepared yet, at most
        ``max_groups`` in all (default 16, env FOMOE_NCCL_MAX_GROUPS: each communicator holds its
        own NCCL buffers once used; later groups run the ring). Collective: every rank must call
        it with the same groups in the same order."""
        if max_groups is None:
            max_groups = int(os.environ.get("FOMOE_NCCL_MAX_GROUPS", "16"))
        for group in groups:
            group = tuple(sorted(int(r) for r in group))
            if len(group) < 2 or group in self._prepared or len(self._prepared) >= max_groups:
                continue
            self._prepared.add(group)
            member = self.rank in group
            handle = self._ops.nccl_split(self.handle, 0 if member else -1, self.rank)
            if member:
                self._group_handles[group] = handle

    @property
    def group_communicators(self) -> list[tuple[int, ...]]:
        """The prepared groups this rank belongs to (each with its own communicator)."""
        return sorted(self._group_handles)

    def _exchange(self, send: Tensor, dst: int, recv: Tensor, src: int) -> None:
        self._ops.nccl_sendrecv(self.handle, send.contiguous(), dst, recv, src)

    def _ring_allreduce(self, buf: Tensor, ranks, plan: RingPlan, wire: torch.dtype) -> tuple[int, int]:
        if buf.device != self.device:
            raise ValueError(f"the NCCL transport's communicator is on {self.device}, the buffer on {buf.device}")
        group = self._group_handles.get(tuple(ranks)) if self.group_allreduce else None
        if group is not None and wire == torch.float32:
            self._ops.nccl_allreduce(group, buf)
            sent, recv = plan.elements()
            return 4 * sent, 4 * recv
        table = torch.tensor(plan.table(), dtype=torch.int64)
        sent, recv = self._ops.nccl_ring_allreduce(self.handle, buf, table, ranks[plan.next_position],
                                                   ranks[plan.prev_position], wire == torch.bfloat16,
                                                   self.slice_elems)
        return int(sent), int(recv)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        for handle in getattr(self, "_group_handles", {}).values():
            self._ops.nccl_destroy(handle)
        self._group_handles = {}
        if getattr(self, "handle", None) is not None:
            self._ops.nccl_destroy(self.handle)
            self.handle = None


_nccl_counter = [0]


def _default_timeout_s() -> float:
    # The process group's store carries the run's timeout (fomoe.launch sets it).
    try:
        from torch.distributed import distributed_c10d as c10d
        return float(c10d._get_default_store().timeout.total_seconds())
    except Exception:  # noqa: BLE001 (private API; fall back to a generous bound)
        return 300.0


def nccl_ops():
    """torch.ops.fomoe_comm when this build has the NCCL transport, else None."""
    try:
        ops = torch.ops.fomoe_comm
        ops.nccl_version  # noqa: B018 (raises if the ops are not registered)
        return ops
    except (AttributeError, RuntimeError):
        return None


def nccl_versions() -> dict | None:
    """NCCL versions as integer codes (e.g. 22809 for 2.28.9): the library loaded in this process,
    the header the extension was compiled against, and the one torch reports; None without NCCL."""
    ops = nccl_ops()
    if ops is None:
        return None
    runtime, compiled = ops.nccl_version()
    torch_code = None
    try:
        major, minor, patch = torch.cuda.nccl.version()[:3]
        torch_code = major * 10000 + minor * 100 + patch if (major, minor) >= (2, 9) else major * 1000 + minor * 100 + patch
    except Exception:  # noqa: BLE001 (torch without NCCL)
        pass
    return {"runtime": int(runtime), "compiled": int(compiled), "torch": torch_code}


def check_nccl_version() -> dict | None:
    """Raise if the NCCL loaded at run time is older than the header fomoe was built against;
    warn if torch reports a different NCCL than the one fomoe's calls reach."""
    v = nccl_versions()
    if v is None:
        return None
    if v["runtime"] < v["compiled"]:
        raise ImportError(f"fomoe was built against NCCL {v['compiled']} but NCCL {v['runtime']} is loaded; rebuild "
                          f"fomoe against the NCCL that torch uses (pip install --no-build-isolation -e .)")
    if v["torch"] is not None and v["torch"] != v["runtime"]:
        warnings.warn(f"torch reports NCCL {v['torch']} but fomoe's NCCL calls reach NCCL {v['runtime']}: two NCCL "
                      f"libraries are loaded; build fomoe against torch's (the nvidia-nccl wheel next to torch)")
    return v


# ---- small control-plane exchanges ---------------------------------------------------------------
#
# Configuration agreement and checkpoint coordination exchange a few strings between workers.
# They go through torch.distributed's store, or through the installed *control plane* (the TCP
# transport installs itself): the store lives in one process (rank 0's, or the launcher's), and a
# run that survives the loss of workers must not depend on it.

_exchange_counter = [0]
_control_plane = [None]


def set_control_plane(plane) -> None:
    """Route ``gather_text`` / ``gather_live`` through ``plane`` (an object with
    ``gather_text(tag, text) -> dict[rank, text]`` over its live ranks and ``live_ranks()``);
    None restores the store."""
    _control_plane[0] = plane


def control_plane():
    return _control_plane[0]


def live_ranks() -> tuple[int, ...]:
    """Ranks of the workers still in the run (all of them without a fault-tolerant control plane)."""
    plane = _control_plane[0]
    if plane is not None:
        return tuple(plane.live_ranks())
    return tuple(range(dist.get_world_size())) if dist.is_initialized() else (0,)


def gather_live(tag: str, text: str, timeout_s: float | None = None) -> dict[int, str]:
    """Every live rank's ``text`` for ``tag``, by rank. Each call on a rank must be matched by a
    call with the same tag on every other live rank."""
    plane = _control_plane[0]
    if plane is not None:
        return dict(plane.gather_text(tag, text))
    return dict(enumerate(_gather_through_store(tag, text, timeout_s)))


def gather_text(tag: str, text: str, timeout_s: float | None = None) -> list[str]:
    """Every rank's ``text`` for ``tag`` (in rank order), through the control plane or
    torch.distributed's store.

    Used to check that all workers agree on a configuration before any collective runs, so a
    mismatch fails on every worker with a clear message instead of hanging. Each call on a
    rank must be matched by a call with the same tag on every other rank. After a worker was
    lost the list holds the live ranks only (use ``gather_live`` to know whose text is whose).
    """
    return [t for _, t in sorted(gather_live(tag, text, timeout_s).items())]


def _gather_through_store(tag: str, text: str, timeout_s: float | None) -> list[str]:
    from torch.distributed import distributed_c10d as c10d
    if not dist.is_initialized():
        raise RuntimeError("gather_text needs torch.distributed initialised (or a control plane)")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return [text]
    store = c10d._get_default_store()
    _exchange_counter[0] += 1
    key = f"fomoe/{tag}/{_exchange_counter[0]}"
    store.set(f"{key}/{rank}", text)
    out = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for r in range(world):
        if deadline is not None:
            store.wait([f"{key}/{r}"], datetime.timedelta(seconds=max(0.0, deadline - time.monotonic())))
        out.append(store.get(f"{key}/{r}").decode())
    # The store may live in rank 0's process: rank 0 returns only once every rank has read, so a
    # rank 0 that fails right after this exchange cannot take the store away from a slower reader.
    if store.add(f"{key}/read", 1) == world:
        store.set(f"{key}/all-read", "1")
    if rank == 0:
        store.wait([f"{key}/all-read"])
    return out


def code_fingerprint() -> str:
    """fomoe's version and a hash of its source files and built extension: workers running
    different code must not train together (their numerics or wire formats may differ)."""
    if _code_fingerprint[0] is None:
        import hashlib
        from pathlib import Path
        from . import __version__
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        files = sorted(root.glob("*.py")) + sorted(root.glob("_C*.so")) + sorted(root.glob("_C*.pyd"))
        for path in files:
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        _code_fingerprint[0] = f"fomoe {__version__} (sources {h.hexdigest()[:12]}), torch {torch.__version__}"
    return _code_fingerprint[0]


_code_fingerprint: list[str | None] = [None]


def _differences(mine, ref, path: str = "") -> list[tuple[str, object, object]]:
    """Leaf paths where two JSON-like values differ: ("model.num_experts", 8, 16). Lists of
    records (dicts) of equal length are compared record by record ("layers[1].top_k"); other
    lists are values."""
    if isinstance(mine, dict) and isinstance(ref, dict):
        out = []
        for k in sorted(set(mine) | set(ref), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in mine or k not in ref:
                out.append((sub, mine.get(k, "<missing>"), ref.get(k, "<missing>")))
            else:
                out.extend(_differences(mine[k], ref[k], sub))
        return out
    if (isinstance(mine, list) and isinstance(ref, list) and len(mine) == len(ref)
            and any(isinstance(v, dict) for v in mine + ref)):
        return [d for i, (a, b) in enumerate(zip(mine, ref)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if mine == ref else [(path or "value", mine, ref)]


def agree(tag: str, config: dict, what: str = "configuration", error: str | None = None) -> None:
    """Raise on every rank unless every rank passed the same ``config`` and no ``error``.

    ``error``: this rank's own validation failure (or None); every rank learns of it, so all
    workers fail together with the same message instead of waiting for the failed one. The code
    version (``code_fingerprint``) is always part of what must agree. The message names every
    differing field by its path (``train.model.num_experts``).
    """
    mine = json.dumps({"config": {"code": code_fingerprint(), **config}, "error": error}, sort_keys=True,
                      default=str)
    everyone = {r: json.loads(t) for r, t in gather_live(tag, mine).items()}
    errors = [(r, d["error"]) for r, d in sorted(everyone.items()) if d["error"] is not None]
    if errors:
        raise ValueError(f"invalid {what}: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
    lines = disagreements({r: d["config"] for r, d in everyone.items()})
    if lines:
        raise ValueError(f"workers disagree on the {what}: " + "; ".join(lines))


def disagreements(configs: dict[int, dict]) -> list[str]:
    """One line for each rank whose ``configs`` entry differs from the lowest rank's, naming
    every differing field by its path (``train.model.num_experts``)."""
    first = min(configs)
    lines = []
    for r, config in sorted(configs.items()):
        diff = _differences(config, configs[first])
        if diff:
            # A long list of differences (or one huge value) would bury the first, telling one.
            shown, more = diff[:MAX_DIFFERENCES_SHOWN], len(diff) - MAX_DIFFERENCES_SHOWN
            line = (f"rank {r} has " + ", ".join(f"{k}={_short_repr(a)}" for k, a, _ in shown)
                    + f" where rank {first} has " + ", ".join(f"{k}={_short_repr(b)}" for k, _, b in shown))
            lines.append(line + (f" (and {more} more differences)" if more > 0 else ""))
    return lines


MAX_DIFFERENCES_SHOWN = 8
MAX_VALUE_CHARS = 200


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "…"


# At import: an extension built against a newer NCCL than the one loaded would fail later, deep
# inside a sync; say so now.
check_nccl_version()
