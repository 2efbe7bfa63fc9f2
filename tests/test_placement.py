"""Placement strategies, validation and serialisation."""

import json
from collections import Counter

import pytest

from fomoe.placement import Placement, PlacementError


def _loads(p: Placement, layer: int) -> list[int]:
    return [len(p.resident(w, layer)) for w in range(p.num_workers)]


@pytest.mark.parametrize("W,E,r", [(4, 8, 2), (3, 8, 2), (5, 7, 3), (4, 4, 4), (6, 4, 2), (2, 3, 1)])
@pytest.mark.parametrize("mode", ["cyclic", "random"])
def test_replicated_gives_every_expert_r_distinct_holders_and_balanced_loads(W, E, r, mode):
    p = Placement.replicated(W, E, 3, r, mode=mode, seed=7)
    for l in range(3):
        for e in range(E):
            holders = p.holders(l, e)
            assert len(holders) == r and len(set(holders)) == r and all(0 <= w < W for w in holders)
            for w in holders:
                assert e in p.resident(w, l)
        loads = _loads(p, l)
        assert sum(loads) == E * r
        assert max(loads) - min(loads) <= 1, loads
        # resident() and holders() describe the same map
        assert sorted((w, e) for w in range(W) for e in p.resident(w, l)) == \
            sorted((w, e) for e in range(E) for w in p.holders(l, e))


def test_cyclic_layout_is_the_documented_round_robin():
    p = Placement.replicated(4, 4, 1, 2)
    assert [p.holders(0, e) for e in range(4)] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert p.resident(2, 0) == [1, 3]


def test_random_is_seeded_differs_by_layer_and_seed():
    a = Placement.replicated(6, 12, 4, 2, mode="random", seed=1)
    b = Placement.replicated(6, 12, 4, 2, mode="random", seed=1)
    c = Placement.replicated(6, 12, 4, 2, mode="random", seed=2)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a != c
    layers = {tuple(tuple(a.holders(l, e)) for e in range(12)) for l in range(4)}
    assert len(layers) > 1
    # Random holder sets are not just the cyclic pairs.
    pairs = Counter(tuple(a.holders(l, e)) for l in range(4) for e in range(12))
    assert len(pairs) > 3


def test_full_and_partition():
    f = Placement.full(3, 5, 2)
    assert f.is_full() and f.replication() == 3
    assert all(f.resident(w, l) == list(range(5)) for w in range(3) for l in range(2))
    p = Placement.partition(3, 5, 2)
    assert not p.is_full() and p.replication() == 1
    owners = [p.holders(0, e) for e in range(5)]
    assert all(len(o) == 1 for o in owners) and sorted(_loads(p, 0)) == [1, 2, 2]
    assert p.experts_per_worker() == [4, 4, 2]


@pytest.mark.parametrize("spec,expect", [
    ("full", Placement.full(4, 8, 2)),
    ("partition", Placement.partition(4, 8, 2)),
    ("replicated:2", Placement.replicated(4, 8, 2, 2)),
    ("replicated:2:cyclic", Placement.replicated(4, 8, 2, 2)),
    ("replicated:3:random", Placement.replicated(4, 8, 2, 3, mode="random", seed=5)),
])
def test_from_spec(spec, expect):
    assert Placement.from_spec(spec, 4, 8, 2, seed=5) == expect


def test_json_round_trip_and_file_spec(tmp_path):
    p = Placement.replicated(5, 6, 3, 2, mode="random", seed=3)
    q = Placement.from_json(p.to_json())
    assert q == p and q.fingerprint() == p.fingerprint() and q.strategy == p.strategy
    path = tmp_path / "placement.json"
    path.write_text(p.to_json())
    assert Placement.from_spec(str(path), 5, 6, 3) == p
    with pytest.raises(PlacementError, match=r"\(workers, experts, layers\) = \(5, 6, 3\), the run has \(4, 6, 3\)"):
        Placement.from_spec(str(path), 4, 6, 3)


def test_fingerprint_depends_on_the_map_only():
    a = Placement.replicated(4, 4, 1, 1)
    b = Placement.explicit([[[0], [1], [2], [3]]])
    assert a == b and a.fingerprint() == b.fingerprint() and a.strategy != b.strategy
    c = Placement.explicit([[[1], [0], [2], [3]]])
    assert c.fingerprint() != a.fingerprint()


def test_explicit_and_from_resident_agree():
    holders = [[[0, 2], [1], [2], [0, 1]], [[0], [1], [2], [0, 1, 2]]]
    p = Placement.explicit(holders)
    assert p.num_workers == 3 and p.resident(0, 0) == [0, 3] and p.resident(2, 1) == [2, 3]
    resident = [[p.resident(w, l) for w in range(3)] for l in range(2)]
    assert Placement.from_resident(resident, 4) == p


@pytest.mark.parametrize("make,message", [
    (lambda: Placement.explicit([[[0], [], [1]]]), "expert 1 is held by no worker"),
    (lambda: Placement.explicit([[[0], [0], [0]]], num_workers=2), "worker 1 holds no expert"),
    (lambda: Placement.replicated(2, 4, 1, 3), "r=3 exceeds the number of workers W=2"),
    (lambda: Placement.replicated(8, 3, 1, 2), "cannot give each of the 8 workers an expert"),
    (lambda: Placement.explicit([[[0], [5]]], num_workers=2), r"names workers \[5\], but ranks are 0..1"),
    (lambda: Placement.explicit([[[0, 0], [1]]]), "lists a holder twice"),
    (lambda: Placement.explicit([[[0], [1]], [[0], [1], [0]]]), "layer 1 has 3 experts, layer 0 has 2"),
    (lambda: Placement.from_spec("replicated:x", 2, 2, 1), "bad placement spec"),
    (lambda: Placement.from_spec("striped", 2, 2, 1), "unknown placement spec"),
    (lambda: Placement.from_spec("nope.json", 2, 2, 1), "does not exist"),
    (lambda: Placement.replicated(4, 4, 1, 2, mode="zigzag"), "'cyclic' or 'random'"),
    (lambda: Placement.full(0, 4, 1), "num_workers must be a positive integer"),
    (lambda: Placement.from_json(json.dumps({"format": "other"})), "not a fomoe placement"),
])
def test_validation_errors_are_clear(make, message):
    with pytest.raises(PlacementError, match=message):
        make()


def test_queries_check_their_arguments():
    p = Placement.full(2, 2, 1)
    with pytest.raises(PlacementError, match="rank 2 out of range"):
        p.resident(2, 0)
    with pytest.raises(PlacementError, match="MoE layer 1 out of range"):
        p.holders(1, 0)
