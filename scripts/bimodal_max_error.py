"""The largest relative error of the two-stream maps (CLIP, VisualBERT, LXMERT, DETR) against the
float64 references of tests/bimodal_reference.py, per test case: the figures docs/METHODS.md
quotes. Runs the reference tests of tests/test_bimodal.py, which log each comparison.

    .venv/bin/python scripts/bimodal_max_error.py
"""
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "errors.tsv"
        subprocess.run([sys.executable, "-m", "pytest", "tests/test_bimodal.py", "-q", "-k", "reference or targets"],
                       cwd=ROOT, env={**os.environ, "RELFAST_MAP_ERRORS": str(log)}, check=True)
        worst = defaultdict(float)
        for line in log.read_text().splitlines():
            test, _, error = line.split("\t")
            worst[test.split("::")[-1]] = max(worst[test.split("::")[-1]], float(error))
    for test, error in sorted(worst.items(), key=lambda item: -item[1]):
        print(f"{error:.2e}  {test}")


if __name__ == "__main__":
    main()
