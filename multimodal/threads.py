"""How many CPU threads decode a token, chosen by measurement when the model is loaded.

A decoding step of a small model is a few hundred small operators. With two or more threads each of
them is an OpenMP parallel region, and under ``OMP_WAIT_POLICY=PASSIVE`` (the default of
``scripts/run``, which keeps a shared machine usable) the threads sleep between regions and are woken
for the next: tens of microseconds per operator. On the project's 2-core AMD EPYC, SmolLM2-135M in
bfloat16 decoded at 23-28 tok/s with two threads and 48-52 tok/s with one, whatever the wait policy;
a 1B model, which is bound by memory bandwidth, wants every core. Which side a model falls on depends
on the model, the CPU, the wait policy and the load, so the engine measures both at load time.

Prefill keeps every thread: it multiplies many tokens at once and is bound by compute.

``torch.set_num_threads`` sets the calling thread's OpenMP team size and a process-wide default that a
thread takes when it first runs a parallel operator. The engine therefore sets the count before the
prefill and before every decoding step (a streamed answer may be resumed by another pooled worker
thread than the one that started it), and sets the load-time count back when the answer ends.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

# Above this many bytes of weights a decoding step is bound by memory bandwidth, which more threads
# raise, and a single step takes long enough that measuring would slow the load: use every thread.
MEASURE_MAX_WEIGHT_BYTES = 2 << 30


def use_threads(n: int) -> None:
    """Set this thread's torch thread count to ``n`` (a no-op when it already is: cheap per token)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def seconds_per_step(step: Callable[[int], None], threads: Sequence[int], steps: int = 6, rounds: int = 3,
                     restore: int | None = None) -> dict[int, float]:
    """Median seconds of one ``step(i)`` call at each thread count. The counts take turns, round by
    round (so a burst of load elsewhere hits them alike); the first call of each round is not timed."""
    restore = torch.get_num_threads() if restore is None else restore
    times: dict[int, list[float]] = {n: [] for n in threads}
    try:
        for _ in range(rounds):
            for n in threads:
                torch.set_num_threads(n)
                step(0)
                for i in range(1, steps + 1):
                    start = time.perf_counter()
                    step(i)
                    times[n].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(restore)
    return {n: statistics.median(t) for n, t in times.items()}


def fastest(timings: dict[int, float], margin: float = 0.05) -> int:
    """The thread count with the fastest step; fewer threads win unless more are faster by ``margin``
    (fewer threads leave cores to the experts and to other users)."""
    best = min(timings, key=lambda n: (timings[n], n))
    fewest = min(timings)
    return fewest if timings[fewest] <= timings[best] * (1 + margin) else best


def timings_text(timings: dict[int, float]) -> str:
    """'1 thread 18.4 ms, 2 threads 39.1 ms': a measurement for logs and benchmark headers."""
    return ", ".join(f"{n} thread{'s' if n > 1 else ''} {t * 1e3:.1f} ms" for n, t in timings.items())
