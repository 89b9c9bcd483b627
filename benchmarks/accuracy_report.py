"""Rows, summaries, the verdict against the claimed accuracy and the printed report of ``predictor_accuracy.py``.

The judge of a row is the counting allocator's peak (``measured``: every CPU allocation, kernel scratch included);
the claim is :mod:`accuracy_targets`'. The live tensors (``measured_tensors``, the dispatch tracker) only explain a
gap (``scratch``: what kernels held beyond live tensors at the peak).
"""

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_targets import MEDIAN_PCT, WORST_PCT, error_pct, within_claim

#: kinds whose kernels include convolutions (oneDNN's convolution workspace: :func:`accuracy_targets.scratch_allowance`)
CONVOLUTION_KINDS = ("cnn",)

_ROW_KEYS = ("kind", "stage", "world_size", "precision", "attention", "checkpointing", "accumulate", "offload", "rank",
             "n_params", "trainable", "micro_batch", "seq_len", "leaked", "seconds", "settings_match",
             "settings_diff")  # fmt: skip


def settings_diff(planned: dict, run: dict) -> dict:
    """The settings that differ between the prediction and the run (of the DeepSpeed config: ``zero_optimization``)."""

    def comparable(settings: dict) -> dict:
        out = {k: v for k, v in settings.items() if k != "deepspeed_config"}
        out["zero_optimization"] = (settings.get("deepspeed_config") or {}).get("zero_optimization")
        return out

    plan, ran = comparable(planned), comparable(run)
    return {k: [plan.get(k), ran.get(k)] for k in sorted(set(plan) | set(ran)) if plan.get(k) != ran.get(k)}


def rows_of(results: "list[dict]", predictions: "dict[int, dict]", methods: "tuple[str, ...]") -> "list[dict]":
    """One row per configuration and rank: measured (steps 2..N) vs each method's prediction for that rank.

    A step is an optimizer step: with gradient accumulation its peak is the highest of its micro-steps' (the
    recorder reads one per micro-batch), and the first window (Adam states created) is left out as the first step.

    A method that does not apply to the kind leaves ``None``; one that raised leaves ``None`` and
    ``<method>_failed`` (``"refusal"`` or ``"crash"``) with ``<method>_error`` (the message).
    """
    rows = []
    for r in results:
        row = {k: r.get(k) for k in _ROW_KEYS}
        window = r.get("accumulate") or 1
        per_step = [r["steps"][i : i + window] for i in range(0, len(r["steps"]) - window + 1, window)]
        short = f"{len(per_step)} optimizer step(s) recorded, 2 needed" if len(per_step) < 2 else None
        row["run_failed"] = r["failed"] or short
        if row["run_failed"]:  # no steady state measured: the row only says so
            row.update({"measured": None, **{f"{m}{x}": None for m in methods for x in ("", "_error_pct")}})
            rows.append(row)
            continue
        steady = [max(s["allocations_peak"] for s in step) for step in per_step[1:]]
        measured, tensors = max(steady), max(s["tensors_peak"] for step in per_step[1:] for s in step)
        row.update(measured=measured, measured_tensors=tensors, scratch=measured - tensors,
                   steady_spread=max(steady) - min(steady), first_step=r["steps"][0]["allocations_peak"],
                   after_setup=r["after_setup"], convolutions=r["kind"] in CONVOLUTION_KINDS)  # fmt: skip
        pred = predictions[r["index"]]
        for method in methods:
            row.update({method: None, f"{method}_error_pct": None, f"{method}_tensors_error_pct": None,
                        f"{method}_within_claim": None})  # fmt: skip
            if method not in pred:
                continue
            if "failed" in pred[method]:
                row.update({f"{method}_failed": pred[method]["failed"], f"{method}_error": pred[method]["error"]})
                continue
            value = pred[method]["per_rank"].get(r["rank"], pred[method]["total"])
            row.update({method: value, f"{method}_error_pct": error_pct(value, measured),
                        f"{method}_tensors_error_pct": error_pct(value, tensors),
                        f"{method}_within_claim": within_claim(value, measured, row["precision"], row["convolutions"]),
                        f"{method}_phase": pred[method]["peak_phase"],
                        f"{method}_seconds": pred[method]["seconds"]})  # fmt: skip
        rows.append(row)
    return rows


def _stats(rows: "list[dict]", method: str) -> "dict[str, Any]":
    applied = [r for r in rows if not r["run_failed"] and (r[method] is not None or r.get(f"{method}_failed"))]
    errors = [abs(r[f"{method}_error_pct"]) for r in applied if r[method] is not None]
    tensors = [abs(r[f"{method}_tensors_error_pct"]) for r in applied if r[method] is not None]
    return {
        "peaks": len(errors),
        "refusals": sum(r.get(f"{method}_failed") == "refusal" for r in applied),
        "crashes": sum(r.get(f"{method}_failed") == "crash" for r in applied),
        "outside_claim": sum(r[f"{method}_within_claim"] is False for r in applied),
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "worst_abs_error_pct": max(errors) if errors else None,
        "median_abs_error_tensors_pct": statistics.median(tensors) if tensors else None,
        "worst_abs_error_tensors_pct": max(tensors) if tensors else None,
    }


def summary(rows: "list[dict]", methods: "tuple[str, ...]", kinds: "tuple[str, ...]") -> "list[dict]":
    """Median and worst |error| per method: over all rows, per kind and per strategy; against every allocation (the
    judge) and against live tensors (``*_tensors``: the explanation, kernel scratch left out)."""
    groups = [("all", "all")] + [(k, "all") for k in kinds] + [("all", s) for s in ("single", "0", "1", "2", "3")]
    out = []
    for kind, stage in groups:
        sel = [r for r in rows if kind in ("all", r["kind"]) and stage in ("all", r["stage"])]
        for method in methods:
            stats = _stats(sel, method)
            if stats["peaks"] or stats["refusals"] or stats["crashes"]:
                out.append({"kind": kind, "stage": stage, "method": method, **stats})
    # the axes beyond the defaults (accumulation, offload, world size other than 2), each over all kinds and stages
    axes = sorted({axis for r in rows for axis in _extra_axes(r)})
    for axis in axes:
        sel = [r for r in rows if axis in _extra_axes(r)]
        for method in methods:
            stats = _stats(sel, method)
            if stats["peaks"] or stats["refusals"] or stats["crashes"]:
                out.append({"kind": "all", "stage": axis, "method": method, **stats})
    return out


def _extra_axes(row: dict) -> "list[str]":
    """The non-default values of the newer axes in a row (``acc2``, ``off:optimizer``, ``ranks4``)."""
    out = []
    if (row.get("accumulate") or 1) > 1:
        out.append(f"acc{row['accumulate']}")
    if row.get("offload", "none") != "none":
        out.append(f"off:{row['offload']}")
    if row["stage"] != "single" and row.get("world_size", 2) != 2:
        out.append(f"ranks{row['world_size']}")
    return out


def verdict(rows: "list[dict]", methods: "tuple[str, ...]") -> "dict[str, dict]":
    """Each method against the claim (:mod:`accuracy_targets`): median |error| <= ``MEDIAN_PCT``, every peak within
    the claim (``WORST_PCT``, under-prediction by the kernels' scratch allowed), no refusal, no crash."""
    out = {}
    for method in methods:
        stats = _stats(rows, method)
        if not (stats["peaks"] or stats["refusals"] or stats["crashes"]):
            continue
        median = stats["median_abs_error_pct"]
        met = (median is not None and median <= MEDIAN_PCT and stats["outside_claim"] == 0
               and stats["refusals"] == 0 and stats["crashes"] == 0)  # fmt: skip
        over = sorted((r for r in rows if r[f"{method}_within_claim"] is False),
                      key=lambda r: -abs(r[f"{method}_error_pct"]))  # fmt: skip
        out[method] = {**stats, "met": met, "outside_claim": [f"{describe(r)} rank {r['rank']}" for r in over]}
    return out


def failed_runs(rows: "list[dict]") -> "list[str]":
    """The runs that did not train (no prediction is compared for them)."""
    return [f"{describe(r)} rank {r['rank']}: {r['run_failed']}" for r in rows if r["run_failed"]]


def describe(row: dict) -> str:
    """A configuration in one line; the newer axes only where they differ from their defaults."""
    stage = "single" if row["stage"] == "single" else f"zero{row['stage']}"
    extra = "".join(f" {axis}" for axis in _extra_axes(row))
    return (f"{row['kind']:7s} {stage:6s} {row['precision']:10s} {row['attention'] or '-':5s} "
            f"ckpt={'on ' if row['checkpointing'] else 'off'}{extra}")  # fmt: skip


def _cell(row: dict, method: str) -> str:
    if row.get(f"{method}_failed"):
        return f"{row[f'{method}_failed']:>10s} {'':7s} {'':7s}"
    if row[method] is None:
        return f"{'-':>10s} {'':7s} {'':7s}"
    mark = "" if row[f"{method}_within_claim"] else "!"
    return (f"{row[method] / 1024:10.1f} {row[f'{method}_error_pct']:+6.2f}{mark or ' '}"
            f" {row[f'{method}_tensors_error_pct']:+7.2f}")  # fmt: skip


def _pct(value: "float | None") -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(
    rows: "list[dict]", summ: "list[dict]", verdicts: "dict[str, dict]", methods: "tuple[str, ...]"
) -> None:
    head = "".join(f" {m + ' KiB':>10s} {'err %':>7s} {'live %':>7s}" for m in methods)
    width = max([40, *(len(describe(r)) for r in rows)])
    print(f"{'configuration':{width}s} rank {'allocs KiB':>11s} {'live KiB':>10s}{head}")
    for r in rows:
        if r["run_failed"]:
            print(f"{describe(r):{width}s} {r['rank']:4d} run failed: {r['run_failed']}")
            continue
        cells = "".join(f" {_cell(r, m)}" for m in methods)
        print(f"{describe(r):{width}s} {r['rank']:4d} {r['measured'] / 1024:11.1f} {r['measured_tensors'] / 1024:10.1f}"
              f"{cells}{'' if r['settings_match'] else '  settings differ'}")  # fmt: skip
    failures = sorted({(m, r[f"{m}_failed"], r[f"{m}_error"]) for r in rows for m in methods if r.get(f"{m}_failed")})
    for method, failed, error in failures:
        print(f"{method} {failed}: {error}")
    print(f"\n{'kind':8s} {'stage':6s} {'method':7s} {'peaks':>5s} {'refused':>7s} {'crashed':>7s}"
          f" {'median |err| %':>15s} {'worst |err| %':>14s}"
          f" {'vs live tensors: median':>24s} {'worst':>6s} {'outside claim':>13s}")  # fmt: skip
    for s in summ:
        print(f"{s['kind']:8s} {s['stage']:6s} {s['method']:7s} {s['peaks']:5d} {s['refusals']:7d} {s['crashes']:7d}"
              f" {_pct(s['median_abs_error_pct']):>15s} {_pct(s['worst_abs_error_pct']):>14s}"
              f" {_pct(s['median_abs_error_tensors_pct']):>24s}"
              f" {_pct(s['worst_abs_error_tensors_pct']):>6s} {s['outside_claim']:13d}")  # fmt: skip
    print(f"\nClaim (benchmarks/accuracy_targets.py, vs the counting allocator): median |error| <= {MEDIAN_PCT} %,"
          f" every peak within {WORST_PCT} % (an under-prediction also by the kernels' scratch allowance: bf16 matmuls,"
          " convolutions), no refusal, no crash. '!': outside the claim.")  # fmt: skip
    for method, v in verdicts.items():
        print(f"  {method:7s} {'MET' if v['met'] else 'NOT MET'}: median {_pct(v['median_abs_error_pct'])} %, worst"
              f" {_pct(v['worst_abs_error_pct'])} %, {v['refusals']} refusals, {v['crashes']} crashes over"
              f" {v['peaks']} peaks; outside the claim: {len(v['outside_claim'])}")  # fmt: skip


def predictor_fingerprint() -> str:
    """SHA-256 of the predictor's sources, to tie a result to the code that predicted it."""
    import hashlib

    from lightning_memopt import predictor

    digest = hashlib.sha256()
    for path in sorted(Path(predictor.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def merge(paths: "list[Path]", methods: "tuple[str, ...]", kinds: "tuple[str, ...]") -> dict:
    """One result from several runs of ``predictor_accuracy.py`` over disjoint parts of the matrix (e.g. the
    strategies split over two commands): rows joined, summary and verdict recomputed, every command kept."""
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for part in parts for r in part["rows"]]
    sources = {part["predictor_sources_sha256"] for part in parts}
    if len(sources) != 1:
        raise SystemExit(f"Expected runs of one predictor, got sources {sorted(sources)}. Fix: rerun the older part.")
    out = {k: v for k, v in parts[0].items() if k not in ("rows", "summary", "verdict", "command")}
    out.update(rows=rows, summary=summary(rows, methods, kinds), verdict=verdict(rows, methods),
               commands=[part["command"] for part in parts], seconds=sum(p["seconds"] for p in parts),
               predicting_seconds=sum(p["predicting_seconds"] for p in parts),
               configurations=sum(p["configurations"] for p in parts),
               failed_runs=[f for p in parts for f in p["failed_runs"]])  # fmt: skip
    print_report(rows, out["summary"], out["verdict"], methods)
    return out


if __name__ == "__main__":  # python benchmarks/accuracy_report.py part1.json part2.json --out merged.json
    import argparse
    import json

    from accuracy_kinds import KINDS

    parser = argparse.ArgumentParser(description="Merge predictor_accuracy.py results of disjoint parts")
    parser.add_argument("parts", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(merge(args.parts, ("module", "config"), KINDS), indent=1, default=str))
