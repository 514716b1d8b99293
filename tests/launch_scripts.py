"""Scripts, one after the other, in the same processes: what the accelerate test launches, so that its two processes
import torch and diffusers once for both scripts (each launch costs seconds of imports on these CPUs).

    accelerate launch tests/launch_scripts.py scripts/a.py --x 1 -- scripts/b.py --y 2

runs each script as ``python scripts/a.py --x 1`` would under the same launch.
"""

import runpy
import sys


def main(argv: list[str]) -> None:
    jobs = [[]]
    for arg in argv:
        if arg == "--":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    for script, *args in jobs:
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
