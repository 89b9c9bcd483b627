"""Write out the full-depth timeline of a reduced-depth trace (see :mod:`.synthesis` for the model), and under
ZeRO-3 the full-depth sequence of DeepSpeed's fetch and release events, replayed as a full trace's would be."""

from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

from lightning_memopt.predictor.trace.synthesis import Replica, SynthesisError

#: a storage as traced: (allocated at, freed at, bytes, storage key)
Record = "tuple[int, int, int, int]"


@dataclass(frozen=True)
class _Block:
    """What a run block does: its segments, its own storages (relative), its hidden-state handovers."""

    fwd: "tuple[int, int]"
    bwd: "tuple[int, int]"
    own: "list[tuple[str, int, str, int, int, int]]"  # (born in, offset, freed in, offset or op, bytes, record)
    output: "tuple[int, int] | None"  # (offset in forward, bytes)
    returned: "tuple[int, int] | None"  # (offset in backward, bytes)
    releases_input: "tuple[str, int, int] | None"  # where its input dies: ("f"|"b", offset) or ("g", op), record
    releases_received: "tuple[str, int, int] | None"
    grads: "tuple[list[int], list[int]]"  # gradient bytes handed over per op of each segment


@dataclass(frozen=True)
class FullDepth:
    """A reduced-depth trace written out at full depth.

    Attributes:
        live, grads, logits, forward_end: as :class:`~lightning_memopt.predictor.trace.step.TraceResult`'s, for the
            whole model.
        gathered: of ``live``, the ZeRO-3 parameters gathered after every op (empty without ZeRO-3 events).
        storages: with ``record``, every storage of the full-depth step as ``(allocated at, freed at, bytes, key)``,
            the key its index (empty otherwise).
        grad_keys: with ``record``, ``(key, freed at)`` of each gradient handed to the engine, in storage order (its
            hand-over is where the trace let it go).
    """

    live: "list[int]"
    grads: "list[int]"
    logits: "list[int]"
    forward_end: int
    gathered: "list[int]"
    storages: "tuple[Record, ...]" = ()
    grad_keys: "tuple[tuple[int, int], ...]" = ()


def synthesize(res: Any, replica: Replica, record: bool = False) -> FullDepth:
    """The full-depth timeline of a reduced-depth trace ``res``.

    Under ZeRO-3 settings (``res.zero3_events``), DeepSpeed's fetch and release events are written out at full depth
    too (:func:`_gathering`) and the coordinator replayed on them: ``gathered`` holds the parameters gathered after
    every op, included in ``live`` (else it is empty). With ``record`` (a trace recorded with its gradients' keys,
    without ZeRO-3 events), every storage is written out too, where it lies at full depth: the replica's own, each
    skipped block's copied from its representative, the hidden states handed between blocks; the gradients among
    them are the replica's and their copies. They add up to ``live`` (checked).

    Raises:
        SynthesisError: when the trace is not fully accounted, or blocks couple in ways synthesis does not model.
    """
    replica.check_complete()
    n = len(res.live)
    records = list(res.storages)
    if _replay(records, n) != list(res.live):
        raise SynthesisError("the trace's storages do not add up to its live bytes")
    if record and res.zero3_events is not None:
        raise SynthesisError("ZeRO-3's gathered parameters are not written out as storages")
    gradients = res.gradient_records() if record else set()
    by_key: "dict[int, list[Record]]" = {}
    for rec in records:
        by_key.setdefault(rec[3], []).append(rec)
    blocks = {j: _read_block(res, replica, j, by_key, records) for j in replica.run}
    _check(replica, blocks)
    handed = {_find(by_key, *w) for j in replica.run for w in (replica.watch[j].output, replica.watch[j].returned) if w}
    # the synthesised order: replica ops, with each skipped block's segment inserted at its marker
    new_index, fwd_start, bwd_start, inserted = [0] * (n + 1), {}, {}, []
    markers: "dict[int, list[tuple[int, str]]]" = {}
    cut: "dict[int, tuple[int, int, str]]" = {}  # op -> (storages freed before the marker before it, block, where)
    for k, block, where, freed, _ in res.markers:
        markers.setdefault(k, []).append((block, where))
        cut[k + 1] = (freed, block, where)
    marks_only = {k + 1 for k in markers}  # the pass-through's own view op: no op of the full model
    length = 0
    order: "list[tuple[int, int]]" = []  # (replica op, -1) or (replica op of the marker, block) per synthesised op
    for k in range(n):
        new_index[k] = length
        if k not in marks_only:
            order.append((k, -1))
            length += 1
        for block, where in markers.get(k, ()):
            rep = blocks[replica.representative(block)]
            seg = rep.fwd if where == "forward" else rep.bwd
            (fwd_start if where == "forward" else bwd_start)[block] = length
            size = seg[1] - seg[0] + 1 if seg[0] >= 0 else 0
            order += [(k, block)] * size
            inserted.append((block, where, length))
            length += size
    new_index[n] = length
    for j in replica.run:  # run blocks' segments, in synthesised positions
        fwd_start[j] = new_index[blocks[j].fwd[0]] if blocks[j].fwd[0] >= 0 else -1
        bwd_start[j] = new_index[blocks[j].bwd[0]] if blocks[j].bwd[0] >= 0 else -1
    diff = [0] * (length + 1)
    written: "list[tuple[int, int, int, bool]]" = []  # (allocated at, freed at, bytes, gradient)

    def put(born: int, dies: int, size: int, gradient: bool = False) -> None:
        dies = min(max(dies, born), length)
        diff[born] += size
        diff[dies] -= size
        if record:
            written.append((born, dies, size, gradient))

    def freed_at(position: int, dies: int) -> int:
        """Where a replica storage freed before op ``dies`` goes; one freed before a skipped block passed is freed
        before that block's inserted ops."""
        if dies in cut and position < cut[dies][0]:
            _, block, where = cut[dies]
            return (fwd_start if where == "forward" else bwd_start)[block]
        return new_index[min(dies, n)]

    def place(freed_in: str, at: int, block: int, position: int) -> int:
        if freed_in == "f":
            return fwd_start[block] + at
        if freed_in == "b":
            return bwd_start[block] + at
        return freed_at(position, at)

    def handover(p: int, step: int) -> int:
        """Where block ``p``'s output (``step=+1``) or returned gradient (``step=-1``) dies: where its neighbour
        releases its input (or its output's gradient), at the offset the neighbour's representative shows."""
        q = replica.neighbour(p, step)
        if q is None:  # the list's last (first) block runs: its handover dies where it was seen to
            rec = _find(by_key, *(replica.watch[p].output if step > 0 else replica.watch[p].returned))
            return freed_at(records.index(rec), rec[1])
        rep = blocks[q] if q in replica.run else blocks[replica.representative(q)]
        release = rep.releases_input if step > 0 else rep.releases_received
        if release is None:
            raise SynthesisError(f"block {replica.names[q]} shows no release of its input")
        return place(release[0], release[1], q, release[2])

    for position, (born, dies, size, key) in enumerate(records):  # the replica's own storages, where they are
        if (born, dies, size, key) not in handed:
            put(new_index[born], freed_at(position, dies), size, position in gradients)
    for block, where, start in inserted:  # the skipped blocks' own storages, copied
        rep = blocks[replica.representative(block)]
        for born_in, offset, freed_in, at, size, position in rep.own:
            if born_in == ("f" if where == "forward" else "b"):
                put(start + offset, place(freed_in, at, block, position), size, position in gradients)
    def handed_gradient(p: int) -> bool:
        """Whether run block ``p``'s returned gradient is a parameter's too (at micro-batch 1 the embedding's
        gradient can be that very storage: ``sum_to_size`` of a batch of one is the tensor itself)."""
        watch = replica.watch[p].returned if gradients and p in replica.run else None
        return watch is not None and records.index(_find(by_key, *watch)) in gradients

    for p in range(len(replica.names)):  # hidden states and their gradients, handed between neighbours
        rep = blocks[p] if p in replica.run else blocks[replica.representative(p)]
        if rep.output is not None and fwd_start.get(p, -1) >= 0:
            put(fwd_start[p] + rep.output[0], handover(p, +1), rep.output[1])
        if rep.returned is not None and bwd_start.get(p, -1) >= 0:
            put(bwd_start[p] + rep.returned[0], handover(p, -1), rep.returned[1], handed_gradient(p))
    live = list(accumulate(diff[:length]))
    deltas = [res.grads[0]] + [b - a for a, b in zip(res.grads, res.grads[1:])]
    grad_steps, logits = [], []
    position = {(block, where): start for block, where, start in inserted}
    for i, (k, block) in enumerate(order):
        if block < 0:
            grad_steps.append(deltas[k])
        else:
            where = "forward" if i < new_index[res.forward_end + 1] else "backward"
            rep = blocks[replica.representative(block)]
            steps = rep.grads[0] if where == "forward" else rep.grads[1]
            grad_steps.append(steps[i - position[(block, where)]])
        logits.append(res.logits[k])
    gathered: "list[int]" = []
    if res.zero3_events is not None:
        gathered = _gathering(res, replica, blocks, new_index, fwd_start, bwd_start, length)
        live = [a + b for a, b in zip(live, gathered)]
    # in the order a trace records them, by the op before which they are freed (the allocator's replay hands an
    # op's outputs out, and takes frees back, in this order)
    written.sort(key=lambda w: w[1])
    storages = tuple((born, dies, size, key) for key, (born, dies, size, _) in enumerate(written))
    if record and _replay(list(storages), length) != live:
        raise SynthesisError("the written-out storages do not add up to the synthesised live bytes")
    grad_keys = tuple((key, dies) for key, (_, dies, _, gradient) in enumerate(written) if gradient)
    end = new_index[res.forward_end + 1] - 1
    return FullDepth(live, list(accumulate(grad_steps)), logits, end, gathered, storages, grad_keys)


def _gathering(
    res: Any,
    replica: Replica,
    blocks: "dict[int, _Block]",
    new_index: "list[int]",
    fwd_start: "dict[int, int]",
    bwd_start: "dict[int, int]",
    length: int,
) -> "list[int]":
    """ZeRO-3's gathered bytes after every op of the full-depth step: DeepSpeed's events written out, then replayed.

    The coordinator decides on the whole module trace (prefetch and reuse distance look ahead across blocks), so
    the replay runs on the full-depth sequence of events, as a full trace records it. Each run block's events and
    the model's own keep their order, at their ops' synthesised positions; each skipped block gets a copy of its
    representative's: from the fetch of the block before its forward to its release after it (every sub-module's
    events in between), and from the fetch when its output's gradient arrives to the release once its input's
    gradient is computed, each at the same offset in the skipped block's own segment, on the skipped block's own
    modules and parameters (by name). Parameter views that a block's saved tensors keep gathered (pins) are copied
    alike. The result equals the full trace's (tests compare them op for op).

    Raises:
        SynthesisError: events that fall outside their block's segments, or run blocks of one class whose events
            differ.
    """
    from lightning_memopt.predictor.trace.zero3 import Zero3Events, gathered_bytes, replay

    rec = res.zero3_events
    n = len(res.live)
    index_of = {name: i for i, name in enumerate(rec.modules)}
    key_of = {name: key for key, name in rec.param_names.items()}
    # markers by the op after which they sit: (place in the sequence, start of the inserted block), in order
    after: "dict[int, list[tuple[int, int]]]" = {}
    for k, block, where, _, seq in res.markers:
        after.setdefault(k + 1, []).append((seq, (fwd_start if where == "forward" else bwd_start)[block]))

    def position(clock: int, seq: int) -> int:
        """Where a moment of the replica (before op ``clock``, at ``seq``) falls in the full-depth step: before the
        block a marker inserted when it came before that marker."""
        for marker_seq, start in after.get(clock, ()):
            if seq < marker_seq:
                return start
        return new_index[min(clock, n)]

    def group(j: int, forward: bool) -> "tuple[int, int] | None":
        """Event indices ``(first, last)`` of block ``j``'s forward (or backward) in the replica (``None``: none)."""
        root = index_of.get(replica.names[j])
        first = None
        for e, (_, kind, m, fwd, in_bwd) in enumerate(rec.events):
            if m != root or fwd != forward or (forward and in_bwd):
                continue
            if first is None and kind == "fetch":
                first = e
            elif first is not None and kind == "release":
                return first, e
        return None

    def relative(name: str, prefix: str) -> "str | None":
        return name[len(prefix) :] if name == prefix or name.startswith(prefix + ".") else None

    class_reps = {replica.representative(i) for i in range(len(replica.names)) if i not in replica.run}
    checked = {j for j in replica.run if replica.neighbour(j, -1) is not None}
    shapes: "dict[int, dict[str, list]]" = {}  # run block -> its events (and pins) relative to its segments
    for j in sorted(class_reps | checked):
        prefix, blk = replica.names[j], blocks[j]
        shape: "dict[str, list]" = {}
        for where, forward, (lo, hi) in (("forward", True, blk.fwd), ("backward", False, blk.bwd)):
            found = group(j, forward)
            if found is None and (forward or lo >= 0):  # a block without backward (frozen, no gradient through it)
                raise SynthesisError(f"block {prefix} shows no ZeRO-3 fetch and release around its {where}")
            if found is not None and lo < 0:
                raise SynthesisError(f"block {prefix} ran no op in its {where}")
            first, last = found if found is not None else (0, -1)
            items = []
            for e in range(first, last + 1):
                clock, kind, m, fwd, in_bwd = rec.events[e]
                if not 0 <= clock - lo <= hi - lo + 1:
                    raise SynthesisError(f"a ZeRO-3 event of block {prefix} falls outside its {where}")
                items.append((clock - lo, kind, relative(rec.modules[m], prefix), m, fwd, in_bwd))
            shape[where] = items
            shape[where + " seq"] = [rec.event_seq[first], rec.event_seq[last]] if found is not None else [0, -1]
        pins = []
        for (key, at, end), (seq_at, seq_end) in zip(rec.pins, rec.pin_seq):
            born = [w for w in ("forward", "backward") if shape[w + " seq"][0] <= seq_at <= shape[w + " seq"][1]]
            if not born:
                continue
            lo = (blk.fwd if born[0] == "forward" else blk.bwd)[0]
            if seq_end is None:
                dies: "tuple[str | None, int]" = (None, 0)
            else:
                died = [w for w in ("forward", "backward") if shape[w + " seq"][0] <= seq_end <= shape[w + " seq"][1]]
                if not died:
                    raise SynthesisError(f"a parameter view saved in block {prefix} outlives its backward")
                dies = (died[0], end - (blk.fwd if died[0] == "forward" else blk.bwd)[0])
            pins.append((born[0], at - lo, *dies, relative(rec.param_names[key], prefix), key))
        shape["pins"] = pins
        shapes[j] = shape

    def signature(shape: "dict[str, list]") -> tuple:
        strip = lambda items: [(o, k, r if r is not None else m, f, b) for o, k, r, m, f, b in items]  # noqa: E731
        return (strip(shape["forward"]), strip(shape["backward"]),
                [(b, a, d, o, r if r is not None else key) for b, a, d, o, r, key in shape["pins"]])  # fmt: skip

    by_class: "dict[Any, list[int]]" = {}
    for j in sorted(checked):
        by_class.setdefault(replica.classes[j], []).append(j)
    for members in by_class.values():
        for a, b in pairwise(members):
            if signature(shapes[a]) != signature(shapes[b]):
                names = f"{replica.names[a]} and {replica.names[b]}"
                raise SynthesisError(f"blocks {names} of one class differ in their ZeRO-3 events")

    def in_block(table: "dict[str, int]", what: str) -> Any:
        """A lookup of a representative's module or parameter (``rel``, its name inside the block) in ``block``."""

        def find(block: int, rel: "str | None", own: int) -> int:
            if rel is None:
                return own
            target = table.get(replica.names[block] + rel)
            if target is None:
                raise SynthesisError(f"block {replica.names[block]} has no {what} {rel!r}")
            return target

        return find

    module_of, param_of = in_block(index_of, "module"), in_block(key_of, "parameter")

    starts = {"forward": fwd_start, "backward": bwd_start}
    events: "list[tuple[int, str, int, bool, bool]]" = []
    pins: "list[tuple[int, int, int | None]]" = []
    pending = sorted((seq, block, where) for _, block, where, _, seq in res.markers)
    p = 0

    def insert(block: int, where: str) -> None:
        shape, start = shapes[replica.representative(block)], starts[where][block]
        if where == "backward" and not shape["backward"]:
            raise SynthesisError(f"block {replica.names[block]} runs a backward its representative does not")
        for offset, kind, rel, m, fwd, in_bwd in shape[where]:
            events.append((start + offset, kind, module_of(block, rel, m), fwd, in_bwd))
        for born, at, died, end, rel, key in shape["pins"]:
            if born == where:
                unpinned = None if died is None else starts[died][block] + end
                pins.append((param_of(block, rel, key), start + at, unpinned))

    for e, (clock, kind, m, fwd, in_bwd) in enumerate(rec.events):
        seq = rec.event_seq[e]
        while p < len(pending) and pending[p][0] < seq:
            insert(*pending[p][1:])
            p += 1
        events.append((position(clock, seq), kind, m, fwd, in_bwd))
    for _, block, where in pending[p:]:
        insert(block, where)
    for (key, at, end), (seq_at, seq_end) in zip(rec.pins, rec.pin_seq):
        pins.append((key, position(at, seq_at), None if end is None else position(end, seq_end)))
    if any(a[0] > b[0] for a, b in pairwise(events)):
        raise SynthesisError("the ZeRO-3 events written out are out of order")
    full = Zero3Events(rec.settings, rec.params, rec.owned, rec.modules, rec.param_names, events, pins)
    return gathered_bytes(replay(full, length - 1), length)


def _replay(records: "list[Record]", n: int) -> "list[int]":
    """Live bytes after every op from the storage records alone."""
    diff = [0] * (n + 1)
    for born, dies, size, _ in records:
        diff[born] += size
        diff[min(dies, n)] -= size
    return list(accumulate(diff[:n]))


def _find(by_key: "dict[int, list[Record]]", key: int, at: int) -> "Record":
    """The storage with ``key`` alive at op ``at`` (keys are reused once a storage is freed)."""
    for rec in by_key.get(key, ()):
        if rec[0] <= at < max(rec[1], rec[0] + 1):
            return rec
    raise SynthesisError(f"no storage {key} alive at op {at}")


def _segment(labels: "tuple[int, ...]", lo: int, hi: int, block: int) -> "tuple[int, int]":
    where = [k for k in range(lo, hi) if labels[k] == block]
    if not where:
        return -1, -1
    if where[-1] - where[0] + 1 != len(where):
        raise SynthesisError(f"the ops of block {block} are not contiguous")
    return where[0], where[-1]


def _where(op: int, fwd: "tuple[int, int]", bwd: "tuple[int, int]") -> "tuple[str, int]":
    """Classify an op against a block's segments: inside (or right after) its forward or its backward, or global."""
    for name, (lo, hi) in (("f", fwd), ("b", bwd)):
        if lo >= 0 and lo <= op <= hi + 1:
            return name, op - lo
    return "g", op


def _read_block(res: Any, replica: Replica, j: int, by_key: "dict", records: "list[Record]") -> _Block:
    end, n = res.forward_end + 1, len(res.live)
    fwd, bwd = _segment(res.labels, 0, end, j), _segment(res.labels, end, n, j)
    if fwd[0] < 0:
        raise SynthesisError(f"block {replica.names[j]} ran no op")
    for lo, hi in (fwd, bwd):
        if lo >= 0 and any(res.logits[k] != res.logits[lo - 1] for k in range(lo, hi + 1)):
            raise SynthesisError(f"block {replica.names[j]} allocates logits")
    watch = replica.watch[j]
    output = _find(by_key, *watch.output) if watch.output else None
    returned = _find(by_key, *watch.returned) if watch.returned else None
    own = []
    for position, rec in enumerate(records):
        born, dies, size, _ = rec
        if rec in (output, returned):
            continue
        if fwd[0] <= born <= fwd[1]:
            born_in = "f"
        elif bwd[0] >= 0 and bwd[0] <= born <= bwd[1]:
            born_in = "b"
        else:
            continue
        freed_in, at = _where(dies, fwd, bwd)
        if freed_in == "g" and dies < n and res.labels[dies] not in (-1, j):
            raise SynthesisError(f"a storage of block {replica.names[j]} is freed inside another block")
        own.append((born_in, born - (fwd[0] if born_in == "f" else bwd[0]), freed_in, at, size, position))

    def release(watched: "tuple[int, int] | None") -> "tuple[str, int, int] | None":
        if watched is None:
            return None
        rec = _find(by_key, *watched)
        return (*_where(rec[1], fwd, bwd), records.index(rec))

    def steps(lo: int, hi: int) -> "list[int]":
        return [res.grads[k] - res.grads[k - 1] for k in range(lo, hi + 1)] if lo >= 0 else []

    return _Block(
        fwd, bwd, own,
        (output[0] - fwd[0], output[2]) if output else None,
        (returned[0] - bwd[0], returned[2]) if returned and bwd[0] >= 0 else None,
        release(watch.input), release(watch.received), (steps(*fwd), steps(*bwd)),
    )  # fmt: skip


def _check(replica: Replica, blocks: "dict[int, _Block]") -> None:
    """Run blocks of one class (none the first of its list) must do the same thing to memory."""
    by_class: "dict[Any, list[int]]" = {}
    for j in sorted(replica.run):
        if replica.neighbour(j, -1) is not None:
            by_class.setdefault(replica.classes[j], []).append(j)

    def shape(blk: _Block) -> tuple:
        own = sorted((b, o, f, a if f != "g" else -1, s) for b, o, f, a, s, _ in blk.own)
        releases = [r[:2] if r and r[0] != "g" else (r and r[0]) for r in (blk.releases_input, blk.releases_received)]
        return (own, blk.output, blk.returned, releases, blk.grads, blk.fwd[1] - blk.fwd[0], blk.bwd[1] - blk.bwd[0])

    for members in by_class.values():
        for a, b in pairwise(members):
            if shape(blocks[a]) != shape(blocks[b]):
                raise SynthesisError(f"blocks {replica.names[a]} and {replica.names[b]} of one class differ")
