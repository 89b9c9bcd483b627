"""A simulator of PyTorch's CUDA caching allocator: what ``torch.cuda.max_memory_reserved`` will be, without a GPU.

The rules follow ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``; the device had torch 2.11) and
the defaults of ``c10/core/AllocatorConfig.h`` / ``c10/cuda/CUDAAllocatorConfig.h`` (torch 2.13's headers hold the
same constants; 2.13 makes the 20 MiB of ``get_allocation_size`` and of the oversize rule configurable as
``large_segment_size`` and ``max_non_split_rounding_size``, both 20 MiB by default, which :class:`AllocatorSettings`
carries). One device, one stream, no CUDA graphs, no ``record_stream`` (a free completes at once), and unlimited
device memory: the retry path that frees cached blocks after a failed ``cudaMalloc``
(``release_available_cached_blocks``, ``release_cached_blocks``) never runs, so the reserved peak is the one of a
run that is not near the device's capacity.

How the predictor should feed it: one event list for a whole run, in program order, with each storage's rounded-up
byte count as torch asks for it (one alloc per storage, not per view). First the parameters and buffers, one
``alloc`` each in ``named_parameters`` order, as ``model.to(device)`` creates them (they are never freed); then per
step: the forward's activations and temporaries as traced (``alloc`` when the op creates the storage, ``free`` after
its last use, saved tensors freed during the backward), the gradients (at the first step each ``.grad`` is an
``alloc`` at the op that produces it; with ``zero_grad(set_to_none=True)`` they are freed at ``zero_grad`` and
allocated again in the next backward), the optimizer's states created lazily at the first ``step()`` (AdamW:
``exp_avg`` then ``exp_avg_sq`` per parameter, plus a 4-byte ``step`` per parameter on the device when
``capturable``/``fused``), and the foreach kernels' temporaries (``_foreach_*`` ops allocate one list of tensors
shaped as the parameters and free it at the end of the statement). The first two steps differ (states appear,
gradients move); the reserved peak of a steady run is reached by the second step, so simulate at least two steps.
Order matters: best fit depends on which blocks are free at each request, so keep the traced order of allocations
and frees within a step rather than grouping them.

Example:
    >>> r = simulate([("alloc", "a", 3 * 2**20), ("alloc", "b", 1000), ("free", "a"), ("alloc", "c", 2**20)])
    >>> r.peak_allocated, r.peak_reserved, r.num_segments  # a: a 20 MiB segment; b: a 2 MiB small one
    (3146752, 23068672, 2)
"""

from bisect import bisect_left, insort
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MiB = 2**20
#: ``kMinBlockSize``: all sizes are rounded to at least 512 bytes
K_MIN_BLOCK_SIZE = 512
#: ``kSmallSize``: the largest "small" allocation is 1 MiB
K_SMALL_SIZE = MiB
#: ``kSmallBuffer``: "small" allocations are packed in 2 MiB segments (and 2 MiB pages when expandable)
K_SMALL_BUFFER = 2 * MiB
#: ``kLargeBuffer``: "large" allocations may be packed in 20 MiB segments (and 20 MiB pages when expandable)
K_LARGE_BUFFER = 20 * MiB
#: ``kMinLargeAlloc``: allocations between 1 and 10 MiB may use ``kLargeBuffer``
K_MIN_LARGE_ALLOC = 10 * MiB
#: ``kRoundLarge``: large allocations are rounded up to 2 MiB
K_ROUND_LARGE = 2 * MiB
#: ``kRoundUpPowerOfTwoIntervals``: one division count per power of two from 1 MiB to 64 GiB
ROUNDUP_INTERVALS = 16
#: virtual address space of one expandable segment (torch reserves 1 1/8 of the device's memory); it only bounds how
#: far one segment can grow, never what is reserved
EXPANDABLE_ADDRESS_SPACE = 2**40
_BASE_ADDRESS = 0x7F0000000000


@dataclass(frozen=True)
class AllocatorSettings:
    """The allocator's settings, as ``PYTORCH_CUDA_ALLOC_CONF`` sets them.

    Args:
        expandable_segments: ``expandable_segments:True``: one segment per pool that grows by mapping pages
            (2 MiB small, ``large_segment_size`` large) instead of one ``cudaMalloc`` per segment.
        max_split_size: ``max_split_size_mb`` in bytes (above 20 MiB); ``None`` is unlimited (the default). Blocks
            at least this large are never split and serve only requests within ``max_non_split_rounding_size``.
        roundup_power2_divisions: ``roundup_power2_divisions``: one count for every size or 16 counts, one per power
            of two from 1 MiB to 64 GiB (``[256:4,>:1]`` written out); each a power of two, 0 or 1 for off.
        max_non_split_rounding_size: ``max_non_split_rounding_mb`` in bytes (default 20 MiB).
        large_segment_size: ``large_segment_size_mb`` in bytes (default 20 MiB, ``kLargeBuffer``).

    Example:
        >>> AllocatorSettings(max_split_size=128 * 2**20).max_split_size
        134217728
    """

    expandable_segments: bool = False
    max_split_size: "int | None" = None
    roundup_power2_divisions: "int | tuple[int, ...] | None" = None
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    large_segment_size: int = K_LARGE_BUFFER

    def __post_init__(self) -> None:
        if self.max_split_size is not None and self.max_split_size <= K_LARGE_BUFFER:
            raise ValueError(
                f"Expected max_split_size above {K_LARGE_BUFFER} bytes (torch rejects max_split_size_mb <= 20), got"
                f" {self.max_split_size}. Fix: pass a larger size or None for unlimited."
            )
        divisions = self.roundup_power2_divisions
        counts = () if divisions is None else (divisions,) if isinstance(divisions, int) else tuple(divisions)
        if not isinstance(divisions, (int, type(None))) and len(counts) != ROUNDUP_INTERVALS:
            raise ValueError(
                f"Expected one division count or {ROUNDUP_INTERVALS} (1 MiB to 64 GiB), got {len(counts)}. Fix: pass"
                " an int or a 16-tuple."
            )
        bad = [c for c in counts if c < 0 or (c > 1 and c & (c - 1))]
        if bad:
            raise ValueError(f"Expected powers of two (or 0/1 for off) as divisions, got {bad}. Fix: use 2, 4, 8...")
        for name in ("max_non_split_rounding_size", "large_segment_size"):
            if getattr(self, name) <= 0 or getattr(self, name) % K_ROUND_LARGE:
                raise ValueError(
                    f"Expected {name} a positive multiple of 2 MiB, got {getattr(self, name)}. Fix: use MiB."
                )

    @property
    def split_limit(self) -> float:
        """``max_split_size`` with ``None`` as infinity."""
        return float("inf") if self.max_split_size is None else self.max_split_size

    def divisions(self, size: int) -> int:
        """``AcceleratorAllocatorConfig::roundup_power2_divisions(size)``: the count for ``size``'s power of two."""
        d = self.roundup_power2_divisions
        if d is None or isinstance(d, int):
            return d or 0
        index = min(max(size.bit_length() - 1 - 20, 0), ROUNDUP_INTERVALS - 1)
        return d[index]


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: ``size`` up to the next of ``divisions`` steps between powers of two.

    Example:
        >>> roundup_power2_next_division(1200, 4)  # steps 1024, 1280, 1536, 1792
        1280
    """
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def round_size(size: int, settings: "AllocatorSettings | None" = None) -> int:
    """``DeviceCachingAllocator::round_size``: the block size a request of ``size`` bytes takes.

    Example:
        >>> round_size(1), round_size(513), round_size(5 * 2**20 + 1, AllocatorSettings(roundup_power2_divisions=4))
        (512, 1024, 6291456)
    """
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = (settings or _DEFAULT).divisions(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(size, divisions)
    return K_MIN_BLOCK_SIZE * ((size + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def get_allocation_size(size: int, settings: "AllocatorSettings | None" = None) -> int:
    """``get_allocation_size``: the ``cudaMalloc`` size of a new segment for a rounded request of ``size``.

    Example:
        >>> get_allocation_size(4096), get_allocation_size(3 * 2**20), get_allocation_size(11 * 2**20 + 512)
        (2097152, 20971520, 12582912)
    """
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return (settings or _DEFAULT).large_segment_size
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


_DEFAULT = AllocatorSettings()


class _Segment:
    __slots__ = ("address", "expandable", "page", "size", "small")

    def __init__(self, address: int, size: int, small: bool, expandable: bool = False, page: int = 0) -> None:
        self.address, self.size, self.small, self.expandable, self.page = address, size, small, expandable, page


class _Block:
    __slots__ = ("allocated", "key", "mapped", "next", "prev", "ptr", "segment", "size")

    def __init__(self, ptr: int, size: int, segment: _Segment, mapped: bool = True) -> None:
        self.ptr, self.size, self.segment, self.mapped = ptr, size, segment, mapped
        self.allocated = False
        self.key: Hashable = None
        self.prev: "_Block | None" = None
        self.next: "_Block | None" = None


class _Pool:
    """``BlockPool``: free blocks ordered by (size, address) (``BlockComparatorSize``, one stream) and unmapped
    expandable ranges ordered by address (``BlockComparatorAddress``)."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[tuple[int, int], _Block] = {}
        self.unmapped: dict[int, _Block] = {}

    def insert(self, block: _Block) -> None:
        key = (block.size, block.ptr)
        insort(self.keys, key)
        self.blocks[key] = block

    def erase(self, block: _Block) -> None:
        key = (block.size, block.ptr)
        i = bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise RuntimeError(
                f"Expected block {block.ptr:#x} of {block.size} bytes in the simulated free pool, got none (an"
                " inconsistent event list: a free of a block never allocated, or freed twice). Fix: pass each"
                " storage's alloc once and its free once, in program order."
            )
        del self.keys[i]
        del self.blocks[key]


@dataclass(frozen=True)
class AllocatorResult:
    """What the allocator's statistics would say after the events.

    Attributes:
        peak_allocated: ``max_memory_allocated``: the most bytes in allocated blocks (rounded block sizes).
        peak_reserved: ``max_memory_reserved``: the most bytes in segments (or mapped pages).
        final_allocated: ``memory_allocated`` after the last event.
        final_reserved: ``memory_reserved`` after the last event.
        num_segments: ``cudaMalloc`` calls (native), or expandable segments created (one per pool in use).
        num_device_alloc: ``num_device_alloc``: ``cudaMalloc`` calls plus page mappings.
        addresses: the address each ``alloc`` event got, in event order.
        segment_allocs: per ``cudaMalloc`` or mapping: (index of the alloc event that caused it, address, bytes).
        peak_reserved_event: index of the event at which reserved first reached its peak (-1: the initial state).
    """

    peak_allocated: int
    peak_reserved: int
    final_allocated: int
    final_reserved: int
    num_segments: int
    num_device_alloc: int
    addresses: "tuple[int, ...]" = field(repr=False)
    segment_allocs: "tuple[tuple[int, int, int], ...]" = field(repr=False)
    peak_reserved_event: int = -1


class CachingAllocatorSimulator:
    """``DeviceCachingAllocator`` for one device and one stream; :func:`simulate` drives it.

    Args:
        settings: the allocator's settings.
        initial_segments: segments already held, in the format of ``torch.cuda.memory._snapshot()["segments"]``
            (``address``, ``total_size``, ``segment_type``, ``blocks`` with ``size``, ``state`` and optionally
            ``address``); an allocated block's key is its address. Peaks start from this state, as after
            ``torch.cuda.reset_peak_memory_stats()``.
        segment_addresses: the addresses ``cudaMalloc`` returns, in order (a recorded run's ``segment_alloc``
            addresses); afterwards, or when not given, new segments get fresh addresses above all others.
    """

    def __init__(
        self,
        settings: AllocatorSettings = _DEFAULT,
        initial_segments: "Sequence[Mapping[str, Any]]" = (),
        segment_addresses: "Iterable[int]" = (),
    ) -> None:
        self.settings = settings
        self.small, self.large = _Pool(True), _Pool(False)
        self.live: dict[Hashable, _Block] = {}
        self.allocated = self.reserved = 0
        self.num_segments = self.num_device_alloc = 0
        self._addresses: Iterator[int] = iter(segment_addresses)
        self._next_address = _BASE_ADDRESS
        for seg in initial_segments:
            self._load_segment(seg)
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    # -- state ------------------------------------------------------------------------------------------------
    def _load_segment(self, seg: "Mapping[str, Any]") -> None:
        if seg.get("is_expandable"):
            raise ValueError(
                "Expected native (cudaMalloc) initial segments, got an expandable one. Fix: replay from empty."
            )
        small = seg.get("segment_type", "large") == "small"
        address, total = int(seg["address"]), int(seg["total_size"])
        segment = _Segment(address, total, small)
        pool = self.small if small else self.large
        ptr, prev = address, None
        for b in seg["blocks"]:
            if int(b.get("address", ptr)) != ptr:
                raise ValueError(
                    f"Expected blocks to tile their segment, got a block at {b['address']:#x}, not {ptr:#x}."
                )
            block = _Block(ptr, int(b["size"]), segment)
            block.prev = prev
            if prev is not None:
                prev.next = block
            if b["state"] in ("active_allocated", "active_pending_free"):
                block.allocated, block.key = True, ptr
                self.live[ptr] = block
                self.allocated += block.size
            elif prev is not None and not prev.allocated:
                raise ValueError(f"Expected free neighbours merged (free_block), got two free blocks at {ptr:#x}.")
            else:
                pool.insert(block)
            ptr += block.size
            prev = block
        if ptr != address + total:
            raise ValueError(f"Expected blocks summing to total_size {total}, got {ptr - address}.")
        self.reserved += total
        self._next_address = max(self._next_address, address + total + K_SMALL_BUFFER)

    def _new_address(self, size: int) -> int:
        address = next(self._addresses, None)
        if address is None:
            address = self._next_address
        self._next_address = max(self._next_address, -(-(address + size) // K_SMALL_BUFFER) * K_SMALL_BUFFER)
        return address

    def _bump(self) -> None:
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # -- malloc -----------------------------------------------------------------------------------------------
    def malloc(self, key: Hashable, nbytes: int) -> tuple[int, "tuple[int, int] | None"]:
        """``DeviceCachingAllocator::malloc``: returns the address and the new segment's (address, size), if any."""
        if key in self.live:
            raise ValueError(f"Expected a new key per live allocation, got {key!r} twice. Fix: free it first.")
        s = self.settings
        size = round_size(nbytes, s)
        pool = self.small if size <= K_SMALL_SIZE else self.large
        block = self._get_free_block(pool, size)
        new_segment = None
        if block is None:
            reserved_before = self.reserved
            block = self._alloc_block(pool, size, get_allocation_size(size, s))
            new_segment = (block.ptr, self.reserved - reserved_before)
        if self._should_split(block, size):
            # alloc_found_block: the front of the block is handed out, the remainder stays free
            remaining = block
            block = _Block(remaining.ptr, size, remaining.segment)
            block.prev, block.next = remaining.prev, remaining
            if block.prev is not None:
                block.prev.next = block
            remaining.prev = block
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated, block.key = True, key
        self.live[key] = block
        self.allocated += block.size
        self._bump()
        return block.ptr, new_segment

    def _get_free_block(self, pool: _Pool, size: int) -> "_Block | None":
        """``get_free_block``: the smallest free block that fits (ties: lowest address), within the oversize rules."""
        i = bisect_left(pool.keys, (size, -1))
        if i == len(pool.keys):
            return None
        block = pool.blocks[pool.keys[i]]
        if block.segment.expandable:
            # an expandable block counts with the unmapped space after it ("the size it can expand to")
            def expandable_size(b: _Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

            while block.segment.expandable and i + 1 < len(pool.keys):
                nxt = pool.blocks[pool.keys[i + 1]]
                if expandable_size(nxt) >= expandable_size(block):
                    break
                i, block = i + 1, nxt
        limit = self.settings.split_limit
        if size < limit <= block.size:
            return None  # do not return an oversized block for a large request
        if size >= limit and block.size >= size + self.settings.max_non_split_rounding_size:
            return None  # an oversized block may be rounded up, but within a limit
        pool.erase(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """``should_split``: small pool or expandable: any 512 B remainder; large: remainder above 1 MiB."""
        remaining = block.size - size
        if block.segment.small or self.settings.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.settings.split_limit and remaining > K_SMALL_SIZE

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int) -> _Block:
        """``alloc_block``: a new ``cudaMalloc`` segment of ``alloc_size``, or pages mapped in an expandable one."""
        if self.settings.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        segment = _Segment(self._new_address(alloc_size), alloc_size, pool.small)
        self.num_segments += 1
        self.num_device_alloc += 1
        self.reserved += alloc_size
        return _Block(segment.address, alloc_size, segment)

    # -- expandable segments ----------------------------------------------------------------------------------
    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """``find_expandable_block``: the lowest address where free and unmapped space together fit ``size``."""

        def allocatable(b: "_Block | None") -> bool:
            return b is not None and not b.allocated

        for ptr in sorted(pool.unmapped):
            c = pool.unmapped[ptr]
            if allocatable(c.prev):
                c = c.prev
            room, b = 0, c
            while room < size and allocatable(b):
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = K_SMALL_BUFFER if pool.small else self.settings.large_segment_size
        space = -(-EXPANDABLE_ADDRESS_SPACE // page) * page
        segment = _Segment(self._new_address(space), space, pool.small, expandable=True, page=page)
        self.num_segments += 1
        candidate = _Block(segment.address, space, segment, mapped=False)
        pool.unmapped[candidate.ptr] = candidate
        return candidate

    def _map_block(self, to_map: _Block, size: int, pool: _Pool) -> None:
        """``map_block``: map whole pages over the first ``size`` bytes of an unmapped block, merge, free it."""
        seg = to_map.segment
        begin = (to_map.ptr - seg.address) // seg.page
        end = -(-(to_map.ptr + size - seg.address) // seg.page)
        mapped = (end - begin) * seg.page
        del pool.unmapped[to_map.ptr]
        to_map.mapped = True
        if mapped < to_map.size:
            rest = _Block(to_map.ptr + mapped, to_map.size - mapped, seg, mapped=False)
            rest.prev, rest.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            pool.unmapped[rest.ptr] = rest
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev, pool)
        self._try_merge_blocks(to_map, to_map.next, pool)
        pool.insert(to_map)
        self.reserved += mapped
        self.num_device_alloc += 1

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """``try_allocate_expandable_block``: map pages until a free block of ``size`` exists, then take it."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped:
            self._map_block(candidate, min(candidate.size, size), pool)
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None  # find_expandable_block guarantees the room
            self._map_block(nxt, min(size - candidate.size, nxt.size), pool)
            candidate = nxt
        pool.erase(candidate)
        return candidate

    # -- free -------------------------------------------------------------------------------------------------
    def free(self, key: Hashable) -> None:
        """``free`` then ``free_block``: the block returns to its pool, merged with free neighbours."""
        block = self.live.pop(key, None)
        if block is None:
            raise ValueError(f"Expected a live allocation, got a free of unknown key {key!r}. Fix: alloc before free.")
        self.allocated -= block.size
        block.allocated, block.key = False, None
        pool = self.small if block.segment.small else self.large
        self._try_merge_blocks(block, block.prev, pool)
        self._try_merge_blocks(block, block.next, pool)
        pool.insert(block)

    @staticmethod
    def _try_merge_blocks(dst: _Block, src: "_Block | None", pool: _Pool) -> None:
        """``try_merge_blocks``: absorb a free neighbour in the same mapping state."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if src.mapped:
            pool.erase(src)
        else:
            del pool.unmapped[src.ptr]
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    def segments(self) -> "list[dict[str, Any]]":
        """The mapped memory in the format of ``torch.cuda.memory._snapshot()["segments"]``, sorted by address."""
        heads = {id(b): b for b in self.live.values()}
        for pool in (self.small, self.large):
            heads.update((id(b), b) for b in pool.blocks.values())
        out = []
        for head in heads.values():
            if head.prev is not None and head.prev.mapped:
                continue
            blocks, b = [], head
            while b is not None and b.mapped:
                state = "active_allocated" if b.allocated else "inactive"
                blocks.append({"address": b.ptr, "size": b.size, "state": state})
                b = b.next
            out.append(
                {
                    "address": head.ptr,
                    "total_size": sum(x["size"] for x in blocks),
                    "allocated_size": sum(x["size"] for x in blocks if x["state"] != "inactive"),
                    "segment_type": "small" if head.segment.small else "large",
                    "is_expandable": head.segment.expandable,
                    "blocks": blocks,
                }
            )
        return sorted(out, key=lambda s: s["address"])


def simulate(
    events: "Iterable[tuple]",
    settings: AllocatorSettings = _DEFAULT,
    *,
    initial_segments: "Sequence[Mapping[str, Any]]" = (),
    segment_addresses: "Iterable[int]" = (),
    reset_peaks_at: "int | None" = None,
) -> AllocatorResult:
    """Replay allocations and frees through the caching allocator (one device, one stream).

    Args:
        events: ``("alloc", key, nbytes)`` and ``("free", key)`` in program order; ``nbytes`` is what torch asks
            the allocator for (a storage's bytes), before rounding.
        settings: the allocator's settings.
        initial_segments: memory already held (see :class:`CachingAllocatorSimulator`).
        segment_addresses: addresses for the ``cudaMalloc`` calls, in order (see :class:`CachingAllocatorSimulator`).
        reset_peaks_at: the index of the event before which the peaks are reset, as
            ``torch.cuda.reset_peak_memory_stats()`` does (a monitor's, at the start of the step it reads); ``None``:
            peaks since the first event.

    Returns:
        The peaks and final values of allocated and reserved bytes, the segments created and every address.

    Example:
        >>> events = [("alloc", i, 12 * 2**20) for i in range(3)] + [("free", 1), ("alloc", "x", 11 * 2**20)]
        >>> r = simulate(events)
        >>> r.num_segments, r.addresses[3] == r.addresses[1]  # the 12 MiB hole fits 11 MiB: no new segment
        (3, True)
        >>> simulate(events, AllocatorSettings(expandable_segments=True)).peak_reserved // 2**20  # 20 MiB pages
        40
    """
    sim = CachingAllocatorSimulator(settings, initial_segments, segment_addresses)
    addresses: list[int] = []
    segment_allocs: list[tuple[int, int, int]] = []
    peak_event, peak = -1, sim.reserved
    for i, event in enumerate(events):
        if i == reset_peaks_at:
            sim.peak_allocated, sim.peak_reserved = sim.allocated, sim.reserved
            peak_event, peak = i, sim.reserved
        if event[0] == "alloc":
            address, new_segment = sim.malloc(event[1], int(event[2]))
            addresses.append(address)
            if new_segment is not None:
                segment_allocs.append((i, *new_segment))
            if sim.reserved > peak:
                peak_event, peak = i, sim.reserved
        elif event[0] == "free":
            sim.free(event[1])
        else:
            raise ValueError(
                f"Expected an 'alloc' or 'free' event, got {event!r}. Fix: ('alloc', key, n) or ('free', key)."
            )
    return AllocatorResult(
        peak_allocated=sim.peak_allocated,
        peak_reserved=sim.peak_reserved,
        final_allocated=sim.allocated,
        final_reserved=sim.reserved,
        num_segments=sim.num_segments,
        num_device_alloc=sim.num_device_alloc,
        addresses=tuple(addresses),
        segment_allocs=tuple(segment_allocs),
        peak_reserved_event=peak_event,
    )


@dataclass(frozen=True)
class TraceReplay:
    """A recorded allocator trace made ready for :func:`simulate`.

    Attributes:
        events: the trace's allocations and completed frees, keyed by address.
        segment_addresses: the ``segment_alloc`` addresses, in order, for ``simulate(segment_addresses=...)``.
        initial_segments: the segments at the start of the trace: the snapshot's segments with the trace undone.
    """

    events: "tuple[tuple, ...]"
    segment_addresses: "tuple[int, ...]"
    initial_segments: "tuple[dict[str, Any], ...]"


def events_from_snapshot(snapshot: "Mapping[str, Any]", device: int = 0) -> TraceReplay:
    """Turn a ``torch.cuda.memory._snapshot()`` into events, with the allocator's state when its trace began.

    The trace's ``alloc`` becomes ``("alloc", address, size)`` and ``free_completed`` becomes ``("free", address)``
    (``free_requested`` only marks a free still waiting for another stream's events); ``segment_alloc`` addresses
    are kept for the replay. The state at the trace's start is the snapshot's ``segments`` (taken after the trace)
    with the trace undone, see :func:`state_before_trace`. The trace must be complete since that state (the
    recording's ring buffer did not wrap) and hold no ``segment_free``/``segment_unmap`` (``empty_cache`` or an
    out-of-memory retry), which the simulator does not model.

    Args:
        snapshot: ``{"segments": [...], "device_traces": [[...], ...]}`` as ``torch.cuda.memory._snapshot()`` gives.
        device: which device's trace.

    Returns:
        The events, the ``cudaMalloc`` addresses and the initial segments.

    Example:
        >>> seg = {"address": 0, "total_size": 2**21, "segment_type": "small",
        ...        "blocks": [{"size": 512, "state": "active_allocated"}, {"size": 2**21 - 512, "state": "inactive"}]}
        >>> trace = [{"action": "alloc", "addr": 0, "size": 100}, {"action": "free_completed", "addr": 512, "size": 9}]
        >>> r = events_from_snapshot({"segments": [seg], "device_traces": [trace]})
        >>> r.events, [(b["address"], b["size"], b["state"]) for b in r.initial_segments[0]["blocks"]][:2]
        ((('alloc', 0, 100), ('free', 512)), [(0, 512, 'inactive'), (512, 512, 'active_allocated')])
    """
    trace = snapshot["device_traces"][device]
    events: list[tuple] = []
    addresses: list[int] = []
    for entry in trace:
        action = entry["action"]
        if action == "alloc":
            events.append(("alloc", int(entry["addr"]), int(entry["size"])))
        elif action == "free_completed":
            events.append(("free", int(entry["addr"])))
        elif action == "segment_alloc":
            addresses.append(int(entry["addr"]))
        elif action in ("segment_free", "segment_map", "segment_unmap", "oom"):
            raise ValueError(
                f"Expected a native trace without {action} (empty_cache, expandable segments or an OOM retry), got"
                f" one at {entry.get('addr', 0):#x}. Fix: record a window without them."
            )
    initial = state_before_trace(snapshot["segments"], trace)
    return TraceReplay(tuple(events), tuple(addresses), tuple(initial))


def _with_addresses(seg: "Mapping[str, Any]") -> "list[tuple[int, int, bool]]":
    ptr, out = int(seg["address"]), []
    for b in seg["blocks"]:
        ptr = int(b.get("address", ptr))
        out.append((ptr, int(b["size"]), b["state"] != "inactive"))
        ptr += int(b["size"])
    return out


def state_before_trace(
    segments: "Sequence[Mapping[str, Any]]", trace: "Sequence[Mapping[str, Any]]"
) -> "list[dict[str, Any]]":
    """The segments before ``trace`` ran, from the segments after it: the trace undone.

    Segments the trace created (``segment_alloc``) are dropped; blocks the trace allocated and still holds are
    freed; blocks freed by the trace but allocated before it are allocated again. A block's size is its size in the
    final snapshot when it is still there, else its rounded request plus, in the large pool, a gap of at most 1 MiB
    before the next allocated block or the segment's end (``should_split`` leaves such a remainder in the block, and
    no free large block is 1 MiB or smaller). Free blocks are the gaps between allocated ones: ``free_block`` merges
    free neighbours, so the allocated blocks alone determine a native segment.

    Args:
        segments: ``torch.cuda.memory._snapshot()["segments"]`` taken after the trace.
        trace: that snapshot's ``device_traces`` entry, oldest first.

    Returns:
        The segments at the trace's start, in the same format (blocks with ``address``, ``size``, ``state``).
    """
    created = {int(e["addr"]) for e in trace if e["action"] == "segment_alloc"}
    allocated: dict[int, int] = {}
    for seg in segments:
        allocated.update((a, s) for a, s, live in _with_addresses(seg) if live)
    requested: dict[int, int] = {}
    for e in reversed(trace):
        addr = int(e["addr"])
        if e["action"] == "alloc":
            allocated.pop(addr, None)
            requested.pop(addr, None)
        elif e["action"] == "free_completed":
            requested[addr] = int(e["size"])
    out = []
    for seg in segments:
        start, total = int(seg["address"]), int(seg["total_size"])
        if start in created:
            continue
        small = seg.get("segment_type", "large") == "small"
        end = start + total
        inside = sorted(
            [(a, s) for a, s in allocated.items() if start <= a < end]
            + [(a, -round_size(r)) for a, r in requested.items() if start <= a < end]
        )
        blocks, ptr = [], start
        for i, (a, s) in enumerate(inside):
            if a > ptr:
                blocks.append({"address": ptr, "size": a - ptr, "state": "inactive"})
            if s < 0:  # re-allocated from the trace's free: its block size is inferred
                s = -s
                nxt = inside[i + 1][0] if i + 1 < len(inside) else end
                if not small and 0 < nxt - (a + s) <= K_SMALL_SIZE:
                    s = nxt - a
            blocks.append({"address": a, "size": s, "state": "active_allocated"})
            ptr = a + s
        if ptr > end:
            raise ValueError(f"Expected blocks inside segment {start:#x}, got one ending at {ptr:#x} past {end:#x}.")
        if ptr < end:
            blocks.append({"address": ptr, "size": end - ptr, "state": "inactive"})
        out.append(
            {"address": start, "total_size": total, "segment_type": "small" if small else "large", "blocks": blocks}
        )
    return out
