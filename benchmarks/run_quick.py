"""Run every benchmark's --quick mode, so the scripts cannot rot (CI runs this)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name} --quick", flush=True)
        rc = subprocess.call([sys.executable, str(script), "--quick"])
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(scripts)} benchmark scripts ran in quick mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
