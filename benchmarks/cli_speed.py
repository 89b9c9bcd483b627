"""Wall time of the command line against ``python -c "import torch, transformers"``, measured in the same run.

Issue 11's target: ``lightning-memopt estimate llama-3-8b`` within 1.3x the time of importing torch and
transformers. Each command runs in a fresh process, ``--repeats`` times, and the median is reported:

* ``import torch, transformers``: the reference;
* ``import lightning_memopt``: the package root alone (lazy: no torch, no Lightning);
* the estimate without the answer cache (``LIGHTNING_MEMOPT_CLI_CACHE=off``): the build and the trace, each time;
* the estimate asked again with the cache on (a fresh cache folder, filled by one untimed call).

    python benchmarks/cli_speed.py --out cli_speed.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.3
ESTIMATE = ["-m", "lightning_memopt.cli", "estimate", "llama-3-8b"]


def timed(argv: "list[str]", env: "dict[str, str]", repeats: int) -> float:
    """Median wall seconds of ``python argv`` in fresh processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, check=True, capture_output=True, timeout=600)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="memopt-cache-")
    off = {**os.environ, "LIGHTNING_MEMOPT_CLI_CACHE": "off"}
    on = {**os.environ, "LIGHTNING_MEMOPT_CLI_CACHE": cache}
    subprocess.run([sys.executable, *ESTIMATE], env=on, check=True, capture_output=True, timeout=600)  # fills it
    reference = timed(["-c", "import torch, transformers"], off, args.repeats)
    rows = [
        ("python -c 'import torch, transformers'", reference),
        ("python -c 'import lightning_memopt'", timed(["-c", "import lightning_memopt"], off, args.repeats)),
        ("lightning-memopt estimate llama-3-8b (cache off)", timed(ESTIMATE, off, args.repeats)),
        ("lightning-memopt estimate llama-3-8b (asked again, cached)", timed(ESTIMATE, on, args.repeats)),
    ]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, median of {args.repeats}")
    print("| command | wall | vs import torch, transformers | target |")
    print("| --- | --- | --- | --- |")
    for name, seconds in rows:
        ratio = seconds / reference
        target = "" if "estimate" not in name else f"<= {TARGET}x ({'met' if ratio <= TARGET else 'MISSED'})"
        print(f"| {name} | {seconds:.2f} s | {ratio:.2f}x | {target} |")
    if args.out:
        data = {"rows": [{"command": n, "seconds": s, "ratio": s / reference} for n, s in rows], "target": TARGET}
        args.out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
