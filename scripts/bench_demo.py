"""Wall time of the default demo as a newcomer runs it (`attrib demo --out DIR`): per stage and in all.

    python scripts/bench_demo.py                 # the default (small) demo in a fresh temporary directory
    python scripts/bench_demo.py --size tiny --architecture gpt2
    python scripts/bench_demo.py --threads 1     # one thread: CPU seconds ≈ a quiet core's wall seconds

The demo runs as a subprocess with stderr to a pipe (not a terminal: one line per stage, as in
CI or a log). Printed per stage: wall seconds, CPU seconds (user+sys of the demo process, all
threads) and CPU / 2, what the stage needs on a quiet 2-core machine when both cores work; the
total adds the interpreter's start and imports (wall and CPU of the whole process). On a shared,
busy machine wall time overstates the cost, and so does the CPU time of two threads (a thread
spins while it waits for the other, descheduled one); with `--threads 1` the CPU time is what
one quiet core needs, an upper bound for two (torch's kernels speed up less than twofold on
these small matrices), and CPU / 2 a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--architecture", default="llama")
    parser.add_argument("--keep", help="run in this directory and keep it (default: a temporary one)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the demo (default: torch's choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-demo-") as scratch:
        out = args.keep or os.path.join(scratch, "demo-run")
        command = [sys.executable, "-m", "attrib", "demo", "--out", out, "--size", args.size,
                   "--architecture", args.architecture]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    stages = summary["stage_seconds"]
    threads = f", OMP_NUM_THREADS={args.threads}" if args.threads else ""
    print(f"attrib demo --size {args.size} --architecture {args.architecture}{threads}  "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"{'stage':<16}{'wall s':>9}{'CPU s':>9}{'CPU/2 s':>9}")
    for name, times in stages.items():
        print(f"{name:<16}{times['wall']:>9.1f}{times['cpu']:>9.1f}{times['cpu'] / 2:>9.1f}")
    staged_wall = sum(times["wall"] for times in stages.values())
    staged_cpu = sum(times["cpu"] for times in stages.values())
    print(f"{'start, imports':<16}{wall - staged_wall:>9.1f}{cpu - staged_cpu:>9.1f}{(cpu - staged_cpu) / 2:>9.1f}")
    print(f"{'total':<16}{wall:>9.1f}{cpu:>9.1f}{cpu / 2:>9.1f}")
    print(f"recall@10 (planted fact document in a query's top 10): {summary['recall_at_10']:.3f}")
    print("stage lines on stderr:")
    for line in done.stderr.splitlines():
        print("  " + line)


if __name__ == "__main__":
    main()
