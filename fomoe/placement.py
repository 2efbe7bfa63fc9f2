"""Expert placement: which workers hold which experts, per MoE layer.

A ``Placement`` is the federation's map. For every MoE layer it lists, for every global
expert, the ranks of the workers that hold it (its *holders*). A worker materialises only
its resident experts; at every outer sync each expert is averaged among its holders only.

Strategies:

- ``full``: every worker holds every expert (the DiLoCo baseline, r = W);
- ``partition``: every expert on exactly one worker (r = 1);
- ``replicated(r)``: every expert on r distinct workers. ``cyclic`` lays the E*r expert
  slots of a layer round-robin over the workers (expert e on workers (e*r + j) mod W,
  j < r), so worker loads differ by at most one expert; ``random`` deals each expert (in a
  seeded random order) to the r least-loaded workers, ties broken at random, and draws a
  fresh map for every layer;
- ``explicit``: any map given as holders[layer][expert] -> ranks.

The JSON form (``to_json`` / ``from_json``) is the holders map plus the sizes; the
``fingerprint`` hashes only the map and sizes, so it identifies the placement in config
hashes regardless of the strategy label.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Sequence

STRATEGIES = ("full", "partition", "replicated", "explicit")


class PlacementError(ValueError):
    """A placement that cannot be used, with the reason."""


class Placement:
    """holders[layer][expert] -> sorted tuple of ranks, for ``num_workers`` workers."""

    def __init__(self, holders: Sequence[Sequence[Sequence[int]]], num_workers: int, strategy: str = "explicit",
                 validate: bool = True) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise PlacementError(f"num_workers must be a positive integer, got {num_workers!r}")
        self.num_workers = num_workers
        self.strategy = strategy
        try:
            self._holders = tuple(tuple(tuple(sorted(int(r) for r in ranks)) for ranks in layer) for layer in holders)
        except TypeError as exc:
            raise PlacementError(f"holders must be a list (layers) of lists (experts) of lists of ranks: {exc}") from exc
        if not self._holders:
            raise PlacementError("a placement needs at least one MoE layer")
        self.num_layers = len(self._holders)
        self.num_experts = len(self._holders[0])
        # resident[layer][rank] -> sorted expert ids, derived once by inverting the holder lists
        # (linear in the placement's size: plans with thousands of workers stay instant).
        resident = [[[] for _ in range(num_workers)] for _ in self._holders]
        for l, layer in enumerate(self._holders):
            for e, ranks in enumerate(layer):
                for w in ranks:
                    if 0 <= w < num_workers:   # out-of-range ranks are reported by validate()
                        resident[l][w].append(e)
        self._resident = tuple(tuple(tuple(experts) for experts in layer) for layer in resident)
        if validate:
            self.validate()

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def full(cls, num_workers: int, num_experts: int, num_layers: int) -> "Placement":
        _check_sizes(num_workers, num_experts, num_layers)
        everyone = tuple(range(num_workers))
        return cls([[everyone] * num_experts for _ in range(num_layers)], num_workers, "full")

    @classmethod
    def partition(cls, num_workers: int, num_experts: int, num_layers: int) -> "Placement":
        p = cls.replicated(num_workers, num_experts, num_layers, 1)
        p.strategy = "partition"
        return p

    @classmethod
    def replicated(cls, num_workers: int, num_experts: int, num_layers: int, r: int, mode: str = "cyclic",
                   seed: int = 0) -> "Placement":
        _check_sizes(num_workers, num_experts, num_layers)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise PlacementError(f"replication factor r must be a positive integer, got {r!r}")
        if r > num_workers:
            raise PlacementError(f"replication factor r={r} exceeds the number of workers W={num_workers}: an "
                                 f"expert cannot be held twice by one worker")
        if num_experts * r < num_workers:
            raise PlacementError(f"{num_experts} experts x r={r} = {num_experts * r} expert copies cannot give each of "
                                 f"the {num_workers} workers an expert; raise r or use fewer workers")
        if mode == "cyclic":
            layer = [tuple((e * r + j) % num_workers for j in range(r)) for e in range(num_experts)]
            holders = [layer] * num_layers
        elif mode == "random":
            holders = [_random_layer(num_workers, num_experts, r, random.Random(f"fomoe-placement/{seed}/{l}"))
                       for l in range(num_layers)]
        else:
            raise PlacementError(f"replicated placement mode must be 'cyclic' or 'random', got {mode!r}")
        return cls(holders, num_workers, f"replicated:{r}:{mode}" + (f":seed={seed}" if mode == "random" else ""))

    @classmethod
    def explicit(cls, holders: Sequence[Sequence[Sequence[int]]], num_workers: int | None = None) -> "Placement":
        """holders[layer][expert] -> ranks. num_workers defaults to 1 + the highest rank named."""
        if num_workers is None:
            named = [r for layer in holders for ranks in layer for r in ranks]
            if not named:
                raise PlacementError("an explicit placement must name at least one holder")
            num_workers = max(int(r) for r in named) + 1
        return cls(holders, num_workers, "explicit")

    @classmethod
    def from_resident(cls, resident: Sequence[Sequence[Sequence[int]]], num_experts: int) -> "Placement":
        """resident[layer][rank] -> expert ids (the worker's view) turned into a placement."""
        num_workers = len(resident[0]) if resident else 0
        holders = []
        for l, per_rank in enumerate(resident):
            if len(per_rank) != num_workers:
                raise PlacementError(f"layer {l} lists {len(per_rank)} workers, layer 0 lists {num_workers}")
            layer: list[list[int]] = [[] for _ in range(num_experts)]
            for w, experts in enumerate(per_rank):
                for e in experts:
                    if not 0 <= int(e) < num_experts:
                        raise PlacementError(f"layer {l}: worker {w} names expert {e}; valid ids are "
                                             f"0..{num_experts - 1}")
                    layer[int(e)].append(w)
            holders.append(layer)
        return cls(holders, num_workers, "explicit")

    @classmethod
    def from_spec(cls, spec: str, num_workers: int, num_experts: int, num_layers: int, seed: int = 0) -> "Placement":
        """'full' | 'partition' | 'replicated:R' | 'replicated:R:cyclic' | 'replicated:R:random' | a JSON file."""
        text = str(spec).strip()
        if text == "full":
            return cls.full(num_workers, num_experts, num_layers)
        if text == "partition":
            return cls.partition(num_workers, num_experts, num_layers)
        if text.startswith("replicated"):
            parts = text.split(":")
            if len(parts) not in (2, 3) or not parts[1].isdigit():
                raise PlacementError(f"bad placement spec {spec!r}: use replicated:R or replicated:R:cyclic|random")
            mode = parts[2] if len(parts) == 3 else "cyclic"
            return cls.replicated(num_workers, num_experts, num_layers, int(parts[1]), mode=mode, seed=seed)
        if text.endswith(".json") or os.path.exists(text):
            if not os.path.isfile(text):
                raise PlacementError(f"placement file {text!r} does not exist")
            with open(text) as f:
                p = cls.from_json(f.read())
            p.check_shape(num_workers, num_experts, num_layers)
            return p
        raise PlacementError(f"unknown placement spec {spec!r}; use full, partition, replicated:R, "
                             f"replicated:R:random or a path to a placement JSON file")

    # ---- queries ------------------------------------------------------------------------------

    def resident(self, rank: int, layer: int) -> list[int]:
        """Global ids of the experts worker ``rank`` holds in MoE layer ``layer``."""
        self._check_rank(rank)
        self._check_layer(layer)
        return list(self._resident[layer][rank])

    def holders(self, layer: int, expert: int) -> list[int]:
        """Ranks of the workers holding ``expert`` in MoE layer ``layer``."""
        self._check_layer(layer)
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"expert {expert} out of range 0..{self.num_experts - 1}")
        return list(self._holders[layer][expert])

    def holder_map(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """The whole map: holders[layer][expert] -> tuple of ranks."""
        return self._holders

    def is_full(self) -> bool:
        everyone = tuple(range(self.num_workers))
        return all(ranks == everyone for layer in self._holders for ranks in layer)

    def replication(self) -> float:
        """Mean number of holders per expert."""
        total = sum(len(ranks) for layer in self._holders for ranks in layer)
        return total / (self.num_layers * self.num_experts)

    def experts_per_worker(self) -> list[int]:
        """Expert copies each worker holds, summed over layers."""
        return [sum(len(self._resident[l][w]) for l in range(self.num_layers)) for w in range(self.num_workers)]

    # ---- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        W = self.num_workers
        for l, layer in enumerate(self._holders):
            if len(layer) != self.num_experts:
                raise PlacementError(f"layer {l} has {len(layer)} experts, layer 0 has {self.num_experts}")
            for e, ranks in enumerate(layer):
                if not ranks:
                    raise PlacementError(f"layer {l}: expert {e} is held by no worker")
                bad = [r for r in ranks if not 0 <= r < W]
                if bad:
                    raise PlacementError(f"layer {l}: expert {e} names workers {bad}, but ranks are 0..{W - 1}")
                if len(set(ranks)) != len(ranks):
                    raise PlacementError(f"layer {l}: expert {e} lists a holder twice: {list(ranks)}")
            for w in range(W):
                if not self._resident[l][w]:
                    raise PlacementError(f"layer {l}: worker {w} holds no expert; every worker needs at least one "
                                         f"expert per MoE layer")

    def check_shape(self, num_workers: int, num_experts: int, num_layers: int) -> None:
        """Raise unless this placement is for exactly these sizes."""
        want, have = (num_workers, num_experts, num_layers), (self.num_workers, self.num_experts, self.num_layers)
        if want != have:
            raise PlacementError(f"placement is for (workers, experts, layers) = {have}, the run has {want}")

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_workers:
            raise PlacementError(f"rank {rank} out of range: the placement has {self.num_workers} workers")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise PlacementError(f"MoE layer {layer} out of range: the placement has {self.num_layers} layers")

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": "fomoe-placement-1", "strategy": self.strategy, "num_workers": self.num_workers,
                "num_experts": self.num_experts, "num_layers": self.num_layers,
                "holders": [[list(r) for r in layer] for layer in self._holders]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        if d.get("format") != "fomoe-placement-1":
            raise PlacementError(f"not a fomoe placement (format {d.get('format')!r})")
        try:
            p = cls(d["holders"], int(d["num_workers"]), d.get("strategy", "explicit"))
        except KeyError as exc:
            raise PlacementError(f"placement JSON lacks the field {exc}") from exc
        p.check_shape(int(d["num_workers"]), int(d["num_experts"]), int(d["num_layers"]))
        return p

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlacementError(f"placement JSON does not parse: {exc}") from exc
        return cls.from_dict(d)

    def fingerprint(self) -> str:
        canonical = json.dumps([self.num_workers, self.num_experts, self.num_layers,
                                [[list(r) for r in layer] for layer in self._holders]], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return (isinstance(other, Placement) and self.num_workers == other.num_workers
                and self._holders == other._holders)

    def __hash__(self) -> int:
        return hash((self.num_workers, self._holders))

    def __repr__(self) -> str:
        return (f"Placement({self.strategy}, workers={self.num_workers}, experts={self.num_experts}, "
                f"layers={self.num_layers}, replication={self.replication():.2f})")

    def describe(self) -> str:
        """Human-readable table: per layer, the experts each worker holds."""
        lines = [repr(self)]
        for l in range(self.num_layers):
            cells = "  ".join(f"w{w}:{list(self._resident[l][w])}" for w in range(self.num_workers))
            lines.append(f"  layer {l}: {cells}")
        return "\n".join(lines)


def _check_sizes(num_workers: int, num_experts: int, num_layers: int) -> None:
    for name, value in (("num_workers", num_workers), ("num_experts", num_experts), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlacementError(f"{name} must be a positive integer, got {value!r}")


def _random_layer(num_workers: int, num_experts: int, r: int, rng: random.Random) -> list[tuple[int, ...]]:
    # Experts in a random order each go to the r least-loaded workers (ties at random): balanced
    # loads (they differ by at most one) with random holder sets.
    loads = [0] * num_workers
    holders: list[tuple[int, ...]] = [()] * num_experts
    order = list(range(num_experts))
    rng.shuffle(order)
    for e in order:
        tiebreak = {w: rng.random() for w in range(num_workers)}
        chosen = sorted(range(num_workers), key=lambda w: (loads[w], tiebreak[w]))[:r]
        for w in chosen:
            loads[w] += 1
        holders[e] = tuple(sorted(chosen))
    return holders
