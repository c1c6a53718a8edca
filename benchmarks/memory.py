"""Peak resident memory of training steps, one fresh process per contender.

Run `python -m benchmarks.memory [--sizes ...]`. TensorFlow's allocator
statistics (used by `benchmarks.run`) do not see every buffer of Keras's step
loop, so this measures what the operating system sees instead: each
contender trains three steps in its own process, and the figure is the rise
of the peak resident set size (`ru_maxrss`) over the level after a warm-up
step on a tiny batch, which loads the code and builds the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _child(name: str, size: str) -> None:
    import numpy as np

    from benchmarks.run import ANCHORS, _keras_contender, _parse_sizes, _torch_steps

    (full,) = _parse_sizes(size)
    tiny = (full[0], 2, full[2], full[3])
    if name == ANCHORS[2]:
        _torch_steps(tiny)[0]()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train = _torch_steps(full)[0]
    else:
        _keras_contender(name, tiny, jit=False)[0]()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train = _keras_contender(name, full, jit=False)[0]
    for _ in range(3):
        train()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rise_mib": float(np.round((after - before) / 1024, 1))}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--sizes", default="64x100x32x128,256x50x64x256")
    parser.add_argument("--no-torch", action="store_true", help="leave torch.nn.LSTM out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    from benchmarks.run import ANCHORS, OURS

    names = [OURS, *ANCHORS[:2]] + ([] if args.no_torch else [ANCHORS[2]])
    print("| size (B,T,D,H) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for size in args.sizes.split(","):
        row = []
        for name in names:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "--child", name, size],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row.append(json.loads(out.strip().splitlines()[-1])["peak_rise_mib"])
            print(f"  {size} {name}: {row[-1]} MiB", file=sys.stderr, flush=True)
        print(f"| {size} | " + " | ".join(f"{v:.1f} MiB" for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
