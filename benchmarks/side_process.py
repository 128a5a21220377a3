"""A peer's script running in its own environment, driven over a line protocol on stdin/stdout
(scripts/bench_lxt.py, scripts/captum_generate.py, scripts/inseq_generate.py): it prints
``ready`` once loaded, then one reply line per command; a reply starting with ``error`` fails."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SideProcess:
    def __init__(self, argv, env=None):
        self.script = os.path.basename(argv[1])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     cwd=ROOT, env=env)
        assert self.read() == "ready"

    def read(self):
        line = self.proc.stdout.readline().strip()
        if not line or line.startswith("error"):
            raise RuntimeError(f"{self.script}: {line or 'exited'} (rc {self.proc.poll()})")
        return line

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
