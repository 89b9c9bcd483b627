"""The tables ``gpu_checks.py`` prints and writes to ``tables.md``, one per check."""


def tables(results: dict) -> str:
    """Every check's table (markdown), then the checks that did not run to the end."""
    out = []
    if results.get("zero_stages", {}).get("runs"):
        out += ["zero_stages", "| strategy | stage | median step | peak allocated | bytes/param |",
                "|---|---|---|---|---|"]
        for r in results["zero_stages"]["runs"]:
            if r.get("status") == "ok":
                out.append(f"| {r['strategy']} | {r['stage']} | {r['median_step_s'] * 1e3:.1f} ms | "
                           f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['peak_bytes_per_param']:.1f} |")
            else:
                out.append(f"| {r.get('variant')} | | {r.get('status')} | | |")
    if results.get("predictor_accuracy", {}).get("rows"):
        out += ["predictor_accuracy", "| attention | ckpt | micro-batch | predicted | measured | error |",
                "|---|---|---|---|---|---|"]
        for r in results["predictor_accuracy"]["rows"]:
            out.append(f"| {r['attention']} | {r['checkpointing']} | {r['micro_batch']} | "
                       f"{r['predicted_bytes'] / 2**30:.2f} GiB | {r['measured_bytes'] / 2**30:.2f} GiB | "
                       f"{100 * r['error']:+.1f} % |")
    if results.get("liger_numerics", {}).get("skipped"):
        out += ["liger_numerics", f"skipped: {results['liger_numerics']['skipped']}"]
    elif results.get("liger_numerics", {}).get("status") == "ok":
        r = results["liger_numerics"]
        out += ["liger_numerics", (f"loss {r['loss_unpatched']:.5f} vs {r['loss_liger']:.5f}"
                                   f" (|diff| {r['loss_abs_diff']:.2e});"
                f" gradient relative difference: max {r['grad_rel_diff_max']:.2e} ({r['grad_rel_diff_max_param']}),"
                f" median {r['grad_rel_diff_median']:.2e}")]
    if results.get("throughput", {}).get("runs"):
        out += ["throughput", "| variant | tokens/s | median step | peak allocated |", "|---|---|---|---|"]
        for r in results["throughput"]["runs"]:
            if r.get("skipped"):
                out.append(f"| {r['variant']} | skipped: {r['skipped']} | | |")
            elif r.get("status") == "ok":
                out.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['median_step_s'] * 1e3:.1f} ms | "
                           f"{r['peak_bytes'] / 2**30:.2f} GiB |")
            else:
                out.append(f"| {r.get('variant')} | {r.get('status')} | | |")
    if results.get("monitor", {}).get("per_step"):
        out += ["monitor", "| zero | step | actual | predicted | error |", "|---|---|---|---|---|"]
        for r in results["monitor"]["per_step"]:
            out.append(f"| {r['zero']} | {r['step']} | {r['actual_peak_bytes'] / 2**30:.3f} GiB | "
                       f"{r['predicted_peak_bytes'] / 2**30:.3f} GiB | {100 * (r['prediction_error'] or 0):+.1f} % |")
        out.append(results["monitor"].get("overhead_stdout", ""))
    if results.get("predictor_families", {}).get("rows"):
        from gpu_families import table

        out += table(results["predictor_families"])
    for name, r in results.items():
        if r.get("status") != "ok":
            out.append(f"{name}: {r.get('status')}")
    return "\n".join(out)
