"""Where the 1-bit route (fbi.sign_gather) gets a layer's gathered signs: coalesced, prefetched
all-gathers of buckets of layers, and, inside an activation-checkpointed block, the bytes its
forward gathered, handed to the block's recomputation in backward.

- A bucket is the routed layers of one block (the architecture's ``blocks``; a routed layer
  outside every block is a bucket of its own). Its first use in a forward packs the signs of
  every member's shard (``ds_tensor``), concatenated, and all-gathers them in one collective;
  the members take their columns of the result.
- A pass is one forward of the engine's module. The first use of a bucket in a pass issues the
  next bucket's gather (``async_op``; on CUDA packed and launched on a side stream), so it
  travels while this block computes. A new pass first drops what the last one left: the
  weights may have changed since (an optimizer step).
- ``checkpoint_contexts`` is the ``context_fn`` of ``torch.utils.checkpoint`` (non-reentrant):
  in the block's forward the layers' bytes are put on a tape; its recomputation takes them
  from the tape, in the same order, instead of gathering again. The tape lives as long as
  the checkpoint's graph: 1 bit per binarized weight of the block, from forward to backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque

import torch
import torch.distributed as dist

from fbi.binarize.packing import pack_signs


def all_gather_single(output, input, group, async_op):
    """``dist.all_gather_single`` (torch 2.13's name); torch 2.11 and 2.12, which the project
    also runs on, have the same collective as ``all_gather_into_tensor`` only. Looked up at
    call time, so that a wrapper installed on ``dist`` (a communication counter) is seen."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


class Bucket:
    """Routed layers' weights (ZeRO-3-partitioned: ``ds_tensor``, ``ds_process_group``) whose
    signs travel in one all-gather."""

    def __init__(self, weights: list[torch.nn.Parameter]) -> None:
        self.weights = weights
        self.group = weights[0].ds_process_group
        self.bytes = [-(-w.ds_tensor.numel() // 8) for w in weights]  # each shard padded to a byte
        self.next: Bucket | None = None
        self._pending = None  # (work, gathered, sent, stream) of a gather in flight
        self._ready: dict[int, torch.Tensor] = {}  # id(weight) -> its bytes, not yet taken
        self._used = False  # taken from in this pass

    def take(self, weight: torch.nn.Parameter) -> torch.Tensor:
        """(world, bytes) uint8: every rank's shard of ``weight``, signs packed 8 per byte. A
        layer taking its bytes twice in a pass gathers its bucket again."""
        if id(weight) not in self._ready:
            self.prefetch()
            self._land()
            if not self._used and self.next is not None:
                self.next.prefetch()
            self._used = True
        return self._ready.pop(id(weight))

    def prefetch(self) -> None:
        """Issue the bucket's gather unless one is in flight or its bytes are here."""
        if self._pending is not None or self._ready:
            return
        device = self.weights[0].ds_tensor.device
        stream = _side_stream(device)
        if stream is not None:  # packing waits for the optimizer's last write of the shards
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            sent = torch.cat([pack_signs(w.ds_tensor) for w in self.weights])
            gathered = sent.new_empty(dist.get_world_size(self.group) * sent.numel())
            work = all_gather_single(gathered, sent, group=self.group, async_op=True)
        self._pending = (work, gathered, sent, stream)

    def drop(self) -> None:
        """Forget what this pass gathered (a gather in flight is waited for: every rank issued
        it)."""
        if self._pending is not None:
            self._pending[0].wait()
        self._pending, self._ready, self._used = None, {}, False

    def _land(self) -> None:
        work, gathered, _, stream = self._pending
        work.wait()
        if stream is not None:
            current = torch.cuda.current_stream(gathered.device)
            current.wait_stream(stream)
            gathered.record_stream(current)
        self._pending = None
        rows = gathered.view(dist.get_world_size(self.group), -1)
        start = 0
        for weight, n in zip(self.weights, self.bytes):
            self._ready[id(weight)] = rows[:, start:start + n]
            start += n


def chain(buckets: list[Bucket]) -> list[Bucket]:
    """Link ``buckets`` (in forward order) so that each prefetches the next."""
    for bucket, after in zip(buckets, buckets[1:]):
        bucket.next = after
    return buckets


def new_pass(buckets: list[Bucket]):
    """A forward pre-hook for the root module: drop the last pass's bytes, prefetch the first
    bucket (it travels while the embedding runs)."""

    def hook(*_) -> None:
        for bucket in buckets:
            bucket.drop()
        if buckets:
            buckets[0].prefetch()

    return hook


_tapes = threading.local()  # .stack: (tape, recording) of the checkpoints being run


def packed_signs(weight: torch.nn.Parameter, bucket: Bucket) -> torch.Tensor:
    """``weight``'s gathered sign bytes (``Bucket.take``), by way of the innermost checkpoint's
    tape: recorded in its forward, taken back in its recomputation."""
    stack = getattr(_tapes, "stack", None)
    if not stack:
        return bucket.take(weight)
    tape, recording = stack[-1]
    if recording:
        packed = bucket.take(weight)
        tape.append((weight, packed))
        return packed
    if not tape or tape[0][0] is not weight:
        raise RuntimeError("zero.gather_signs: a checkpointed block's recomputation uses its "
                           "binarized layers in another order than its forward did")
    return tape.popleft()[1]


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint(..., use_reentrant=False)``: (forward
    context, recomputation context) sharing one tape."""
    tape: deque = deque()
    return _Taping(tape, True), _Taping(tape, False)


class _Taping:
    def __init__(self, tape: deque, recording: bool) -> None:
        self.entry = (tape, recording)

    def __enter__(self) -> None:
        if not hasattr(_tapes, "stack"):
            _tapes.stack = []
        _tapes.stack.append(self.entry)

    def __exit__(self, *exc) -> None:
        _tapes.stack.pop()


_streams: dict = {}  # device -> the side stream of its sign gathers


def _side_stream(device: torch.device):
    """One side stream per CUDA device for the sign gathers; None elsewhere."""
    if device.type != "cuda":
        return None
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
