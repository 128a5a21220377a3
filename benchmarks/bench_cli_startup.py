"""CLI startup (issue 23): wall time of a fresh ``python -m relfast.cli`` process that answers
without doing any model work, one group ``cli-startup``:

* ``help``: ``relfast --help``;
* ``flag_mistake``: ``relfast explain --imgae x.png --out y.png`` (argparse's one-line error);
* ``bad_method``: ``relfast explain --image x.png --method bogus --out y.png`` (relfast's own check);
* ``python_only`` and ``import_torch``: an empty interpreter and ``import torch``, the floor and
  what the CLI saves by not importing torch before a subcommand needs it.

Target: ``help`` under 1 s on an idle machine. Each round starts a new interpreter, so the
operating system's file cache is warm after the first round (a cold first start is slower).
"""
import subprocess
import sys

import pytest

COMMANDS = {
    "help": ["-m", "relfast.cli", "--help"],
    "flag_mistake": ["-m", "relfast.cli", "explain", "--imgae", "x.png", "--out", "y.png"],
    "bad_method": ["-m", "relfast.cli", "explain", "--image", "x.png", "--method", "bogus", "--out", "y.png"],
    "python_only": ["-c", "pass"],
    "import_torch": ["-c", "import torch"],
}
EXIT_CODES = {"help": 0, "flag_mistake": 2, "bad_method": 2, "python_only": 0, "import_torch": 0}


@pytest.mark.benchmark(group="cli-startup")
@pytest.mark.parametrize("name", list(COMMANDS))
def test_cli_startup(benchmark, name):
    def run():
        return subprocess.run([sys.executable, *COMMANDS[name]], capture_output=True, text=True)

    done = run()  # also warms the file cache
    assert done.returncode == EXIT_CODES[name], done.stderr
    if name != "help" and EXIT_CODES[name]:
        assert done.stderr.count("\n") <= 3, done.stderr  # a usage line and the one-line error, no traceback
    benchmark.pedantic(run, rounds=10, iterations=1)
