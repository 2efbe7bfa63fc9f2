"""Device time of work replayed from a CUDA graph, shared by the benchmarks, and the JSON
record the kernel microbenchmarks that use it write.

Replaying a captured graph leaves out the host (Python, dispatcher, launches), so the time is
the kernels' and the gaps between them.
"""

from __future__ import annotations

import json
import statistics

import torch


def graph_replay_ms(calls, reps: int, warmups: int = 1) -> float:
    """Median milliseconds per replay of one CUDA graph holding ``calls`` (callables) in order.

    Each distinct callable first runs ``warmups`` times on a side stream (PyTorch's capture
    recipe: lazy initialisation and allocator warm-up stay out of the graph).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in dict.fromkeys(calls):  # each distinct callable, in order
            for _ in range(warmups):
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def write_rows_json(path: str, rows: list[dict]) -> None:
    """A microbenchmark's rows with the GPU and the torch version they were measured on."""
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
