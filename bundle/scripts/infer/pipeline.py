"""Read the next block, compute the current one and write the previous one at the same time.

Segmenting a tomogram is read -> network -> write per block of slices; run one after the other, the
network waits for the disk twice per block. :func:`run_overlapped` runs the reading in one thread
and the writing in another while the caller's thread computes.

Why threads and not processes: numpy copies, file reads and writes (mrcfile/tifffile memory maps,
zarr's codecs) and torch's kernels all release the GIL, so the three stages do run at once, and one
process keeps the network's memory (weights, kept tensors) in one place instead of pickling blocks
between processes. Only the standard library's ``threading`` and ``queue`` are used: a
``concurrent.futures`` pool has no bounded hand-over between two workers.

Memory stays flat with the tomogram's depth: the queues between the stages hold at most ``depth``
blocks each, so at most :func:`max_in_flight` blocks are read and not yet written at any time.
Errors: the first exception of any stage is raised in the caller with its own type and message,
the other stages stop at their next hand-over, and both threads have ended when this returns or
raises (also on KeyboardInterrupt in the caller's thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["DEPTH", "max_in_flight", "run_overlapped"]

K = TypeVar("K")  # the key of a block (e.g. its slice range)
R = TypeVar("R")  # what reading gives
C = TypeVar("C")  # what computing gives

DEPTH = 2  # blocks waiting between two stages
_POLL_S = 0.1  # how often a waiting stage looks whether another one failed
_END = object()  # no more blocks
_GIVE_UP_S = 10.0  # how long leaving early waits for each stage to stop


def max_in_flight(depth: int = DEPTH) -> int:
    """Blocks read and not yet written, at most: one in each stage plus two full queues."""
    return 2 * depth + 3


class _Stopped(Exception):
    """Another stage failed (or the caller left): this one ends quietly."""


class _Stages:
    """The hand-overs between the stages and the first error of any of them."""

    def __init__(self, depth: int) -> None:
        self.read: queue.Queue = queue.Queue(maxsize=depth)
        self.computed: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self.stop.set()

    def put(self, hand_over: queue.Queue, item: object) -> None:
        # Waits in short steps rather than forever: a stage that failed no longer takes items.
        while not self.stop.is_set():
            try:
                hand_over.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(self, hand_over: queue.Queue) -> object:
        while not self.stop.is_set():
            try:
                return hand_over.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise _Stopped


def _reader(stages: _Stages, keys: Iterable[K], read: Callable[[K], R]) -> None:
    try:
        for key in keys:
            stages.put(stages.read, (key, read(key)))
        stages.put(stages.read, _END)
    except _Stopped:
        pass
    except BaseException as err:  # handed to the caller's thread, which raises it
        stages.fail(err)


def _writer(stages: _Stages, write: Callable[[K, C], None]) -> None:
    try:
        while (item := stages.get(stages.computed)) is not _END:
            write(*item)  # type: ignore[misc]
    except _Stopped:
        pass
    except BaseException as err:
        stages.fail(err)


def run_overlapped(
    keys: Iterable[K],
    read: Callable[[K], R],
    compute: Callable[[K, R], C],
    write: Callable[[K, C], None],
    depth: int = DEPTH,
) -> None:
    """For every key in order: ``write(key, compute(key, read(key)))``, the three stages overlapped.

    ``read`` runs in a reader thread, ``compute`` in the caller's thread, ``write`` in a writer thread;
    each stage sees the keys in their order, so writes stay in the order of ``keys``.
    """
    stages = _Stages(max(1, int(depth)))
    threads = [
        threading.Thread(target=_reader, args=(stages, keys, read), name="segment-reader", daemon=True),
        threading.Thread(target=_writer, args=(stages, write), name="segment-writer", daemon=True),
    ]
    for thread in threads:
        thread.start()
    leaving_early = True  # until the last block is handed to the writer
    try:
        while (item := stages.get(stages.read)) is not _END:
            key, data = item  # type: ignore[misc]
            result = compute(key, data)
            del item, data  # the read block is not kept while waiting for the writer
            stages.put(stages.computed, (key, result))
            del result
        stages.put(stages.computed, _END)
        leaving_early = False
        threads[1].join()  # the writer ends after the last block (or on its own error)
    except _Stopped:
        pass  # a thread failed: its error is raised below
    except BaseException as err:
        stages.fail(err)
        raise
    finally:
        stages.stop.set()
        for thread in threads:
            # Leaving early (an error, Ctrl-C) never waits on a stage for long: a stage stuck in a
            # read or write must not hang the caller; the threads are daemons and die with the process.
            thread.join(timeout=_GIVE_UP_S if leaving_early else None)
    if stages.error is not None:
        raise stages.error
