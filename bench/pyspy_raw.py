"""Summarise a py-spy raw profile (`py-spy record -f raw --threads [--gil] [--subprocesses]`): samples per process
and thread, and the functions each thread spends them in.

With --gil a sample is kept only for the thread that holds the GIL, so a thread's samples over `rate x seconds` is its
share of the GIL; without it, its share of the wall.

  python bench/pyspy_raw.py profile.raw --rate 100 [--match default_worker] [--frame EngineLoop.run] [--top 8]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def parse(path: str):
    """(process, thread, frames, count) per line; process is '' without --subprocesses."""
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        process = ""
        while parts and parts[0].startswith("process "):  # --subprocesses: the chain of parents, the process last
            process = parts.pop(0)
        thread = parts.pop(0) if parts and parts[0].startswith("thread ") else ""
        if parts and not FRAME.match(parts[0]):  # the thread's name, when py-spy knows it
            thread = f"{thread} {parts.pop(0)}"
        yield process, thread, parts, int(count)


def short(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['fn']} ({m['file']})" if m else frame


def where(frames: list[str], packages: tuple[str, ...]) -> str:
    """The innermost frame from one of `packages`, and the leaf frame when that is another one."""
    if not frames:
        return "?"
    leaf = short(frames[-1])
    for frame in reversed(frames):
        m = FRAME.match(frame)
        if m and any(p in m["file"] for p in packages):
            mine = short(frame)
            return mine if mine == leaf else f"{mine} > {leaf}"
    return leaf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("--match", default="", help="only processes whose line contains this")
    ap.add_argument("--frame", default="", help="only samples whose stack has a frame starting with this, e.g. "
                    "Worker._generate: the worker's main thread while it drives the engine, not while it loads it")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=0, help="the profiled span, for shares of the wall (or GIL)")
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--packages", default="batchrun,transformers,ray,bench",
                    help="frames from these paths name where a sample was")
    args = ap.parse_args()
    packages = tuple(args.packages.split(","))
    threads: Counter = Counter()
    places: dict[tuple, Counter] = defaultdict(Counter)
    for process, thread, frames, n in parse(args.raw):
        if args.match and args.match not in process:
            continue
        if args.frame and not any(f.startswith(args.frame) for f in frames):
            continue
        key = (process[:70], re.sub(r"^thread \((0x[0-9a-f]+|\d+)\):? ?", "", thread).strip() or thread)
        threads[key] += n
        places[key][where(frames, packages)] += n
    total = sum(threads.values())
    span = args.seconds * args.rate
    print(f"{total} samples" + (f" over {args.seconds:g} s at {args.rate:g} Hz ({span:.0f} possible)" if span else ""))
    for key, n in threads.most_common():
        share = f"{n / span:7.1%} of the span" if span else f"{n / total:7.1%} of samples"
        print(f"{n:>7} {share}  {key[0]}  {key[1]}")
        for place, m in places[key].most_common(args.top):
            print(f"          {m:>7} {m / n:6.1%}  {place}")


if __name__ == "__main__":
    main()
