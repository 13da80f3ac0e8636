"""docs/loader.md as a reader runs it: every command of its code blocks, as written, in order, from a fresh folder
(sizes shrunk only for the benchmark), each exiting 0 and printing what the document says it measures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from doc_commands import every_command_in, shell_env

REPO = Path(__file__).resolve().parent.parent
# The benchmark's defaults take minutes; fewer images, batches and rounds measure the same things.
SHRUNK = {"benchmarks/loader_throughput.py": "--images 1000 --batches 3 --rounds 1"}


def test_every_command_of_the_loader_doc_runs_as_written(tmp_path):
    found = every_command_in("docs/loader.md")  # as tests/doc_commands.py reads them: each counts as run here
    assert len(found) == 9, found  # a command added to the document is run here too
    for name in ("benchmarks", "tests"):  # the document's commands are typed at the repository's root
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "pyproject.toml").symlink_to(REPO / "pyproject.toml")
    for command in found:
        for script, smaller in SHRUNK.items():
            command = command.replace(script, f"{script} {smaller}") if script in command else command
        r = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**shell_env(), "PYTHONUNBUFFERED": "1"})
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        if "timeit" in command:
            assert re.search(r"\d+ loops?, best of \d+: [\d.]+ [mun]?sec per loop", r.stdout), r.stdout
        elif "loader_throughput" in command:
            assert re.search(r"\| raw \| [\d,]+ \|", r.stdout) and "raw vs jpeg per loader core" in r.stdout, r.stdout
        elif "pytest" in command:
            assert re.search(r"\b1 passed\b", r.stdout), r.stdout
