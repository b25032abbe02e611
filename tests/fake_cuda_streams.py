"""CUDA streams and events stood in on the CPU, with a checker of the ordering a real GPU needs.

On a GPU, a copy queued on a side stream runs concurrently with the kernels of the compute stream; nothing orders
the two but `wait_stream` / `wait_event` (and the caching allocator, told by `record_stream`). On the CPU every op
runs at once, so a missing wait never shows in the numbers. `StreamChecker` installs fake `torch.cuda.Stream`,
`Event`, `current_stream` and `stream`, sees every aten op through a dispatch mode, and records which stream issued
it (the current fake stream) and which storages it read or wrote. An access races with an earlier access from
another stream when one of them writes and the later stream was not made to wait for the earlier op:

* read after write: e.g. a block's kernels read its weight slot before the side-stream copy into it is waited for;
* write after read/write: e.g. the side stream copies the next block into a slot whose last kernels were not
  waited for.

Storages are followed from the start when `permanent` (block-swap slots and host copies), and from the first
side-stream write otherwise (offload buffers). A non-permanent storage that a side stream reads must have been
handed to `record_stream` for that stream, else the allocator could give its memory away while the copy runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class FakeStream:
    def __init__(self, checker: StreamChecker, name: str):
        self.checker = checker
        self.name = name
        self.issued = 0  # ops issued on this stream so far
        self.visible: dict[FakeStream, int] = {}  # other stream -> ops of it known complete before the next op here

    def __repr__(self) -> str:
        return f"<stream {self.name}>"

    def snapshot(self) -> dict[FakeStream, int]:
        return {**self.visible, self: self.issued}

    def _see(self, known: dict[FakeStream, int]) -> None:
        for stream, count in known.items():
            if stream is not self:
                self.visible[stream] = max(self.visible.get(stream, 0), count)

    def wait_stream(self, other: FakeStream) -> None:
        self.checker.log.append(("wait_stream", self.name, other.name))
        self._see(other.snapshot())

    def wait_event(self, event: FakeEvent) -> None:
        self.checker.log.append(("wait_event", self.name, event.recorded_on))
        self._see(event.known)


class FakeEvent:
    def __init__(self, checker: StreamChecker):
        self.checker = checker
        self.known: dict[FakeStream, int] = {}
        self.recorded_on: str | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.checker.current
        self.known = stream.snapshot()
        self.recorded_on = stream.name


@dataclass
class Access:
    stream: FakeStream
    index: int  # the op's number on its stream (1-based)
    op: str


@dataclass
class StorageHistory:
    last_write: Access | None = None
    reads: dict[FakeStream, Access] = field(default_factory=dict)  # each stream's latest read since the last write


class StreamChecker(TorchDispatchMode):
    """The fake streams' dispatch mode: `with StreamChecker().install(monkeypatch) as checker: ...`, then
    `checker.races` (and `checker.unrecorded_side_reads()`) should be empty.

    `permanent`: storages that live as long as the test (block-swap host copies and slots): a side stream may
    read them without `record_stream`."""

    def __init__(self, permanent: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.permanent = {t.untyped_storage().data_ptr() for t in permanent}
        self.compute = FakeStream(self, "compute")
        self.current = self.compute
        self.history: dict[int, StorageHistory] = {}
        self.races: list[str] = []
        self.side_reads: set[tuple[int, FakeStream]] = set()
        self.recorded: set[tuple[int, FakeStream]] = set()
        self.log: list[tuple] = []
        self.side_ops = 0

    # ---- the fake torch.cuda API -----------------------------------------------------------------------------

    def install(self, monkeypatch) -> StreamChecker:
        checker = self

        @contextlib.contextmanager
        def use_stream(stream: FakeStream) -> Iterator[None]:
            previous, checker.current = checker.current, stream
            try:
                yield
            finally:
                checker.current = previous

        def record_stream(tensor: torch.Tensor, stream: FakeStream) -> None:
            # From here the allocator keeps the memory until the stream's queued work is done: later writes to
            # the address (a new tensor) need not wait for those reads.
            ptr = tensor.untyped_storage().data_ptr()
            checker.recorded.add((ptr, stream))
            history = checker.history.get(ptr)
            if history is not None:
                history.reads.pop(stream, None)

        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: FakeStream(self, "side"))
        monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: FakeEvent(self))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: checker.current)
        monkeypatch.setattr(torch.cuda, "stream", use_stream)
        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
        return self

    # ---- the checker -----------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        stream = self.current
        stream.issued += 1
        if stream is not self.compute:
            self.side_ops += 1
        schema = func._schema.arguments
        named = {**{a.name: v for a, v in zip(schema, args)}, **kwargs}
        reads, writes = [], []
        for argument in schema:
            alias = argument.alias_info
            write = alias is not None and alias.is_write
            if alias is not None and not write:
                continue  # a view: no memory is touched
            for tensor in tree_flatten(named.get(argument.name))[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    (writes if write else reads).append(tensor)
        if all(r.alias_info is None for r in func._schema.returns):  # new tensors (not views or in-place results)
            writes += [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        access = Access(stream, stream.issued, str(func))
        for tensor in reads:
            self._read(tensor.untyped_storage().data_ptr(), access)
        for tensor in writes:
            self._write(tensor.untyped_storage().data_ptr(), access)
        return out

    def _check(self, earlier: Access, later: Access, kind: str) -> None:
        if earlier.stream is not later.stream and later.stream.visible.get(earlier.stream, 0) < earlier.index:
            self.races.append(f"{kind}: {later.op} on {later.stream.name} (op {later.index}) vs {earlier.op} on "
                              f"{earlier.stream.name} (op {earlier.index}) without a wait")

    def _read(self, ptr: int, access: Access) -> None:
        if ptr == 0:
            return
        history = self.history.setdefault(ptr, StorageHistory())
        if history.last_write is not None:
            self._check(history.last_write, access, "read after write")
        history.reads[access.stream] = access
        if access.stream is not self.compute and ptr not in self.permanent:
            self.side_reads.add((ptr, access.stream))

    def _write(self, ptr: int, access: Access) -> None:
        if ptr == 0:
            return
        history = self.history.setdefault(ptr, StorageHistory())
        if history.last_write is not None:
            self._check(history.last_write, access, "write after write")
        for read in history.reads.values():
            self._check(read, access, "write after read")
        history.last_write, history.reads = access, {}

    def unrecorded_side_reads(self) -> list[tuple[int, str]]:
        """Non-permanent storages a side stream read without `record_stream` for it."""
        return sorted((ptr, stream.name) for ptr, stream in self.side_reads - self.recorded)
