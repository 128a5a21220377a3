"""The set-up is reproducible and drift is visible: the packages relfast's behaviour depends on
are the versions constraints.txt pins (what `make` installs), and those lie inside the ranges
pyproject.toml declares. A newer release installed by hand fails here, by name, before it
fails somewhere deep in the suite."""
import re
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY_PACKAGES = ["torch", "torchvision", "transformers", "timm", "onnx", "onnxscript", "onnxruntime-gpu", "numpy"]


def pins():
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def release(text):
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


@pytest.mark.parametrize("package", KEY_PACKAGES)
def test_installed_version_is_the_pinned_one(package):
    pinned = pins()
    assert package in pinned, f"constraints.txt pins no version of {package}"
    installed = version(package)
    assert installed == pinned[package], (
        f"{package} {installed} is installed but the suite is tested with {pinned[package]} (constraints.txt): "
        "reinstall with `make install`, or run the suite on the new release and regenerate constraints.txt")


@pytest.mark.parametrize("package", ["torch", "transformers", "timm"])
def test_pins_lie_inside_the_declared_ranges(package):
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{package}>=([\d.]+),<([\d.]+)"', text)
    assert match, f"pyproject.toml declares no range for {package}"
    low, high = release(match.group(1)), release(match.group(2))
    assert low <= release(pins()[package]) < high, (package, pins()[package], match.groups())
