"""Every command in the docs is accounted for: each shell command of README.md and docs/*.md is run as written by
a test (a literal `documented(...)` call, or `every_command_in(doc)`: tests/doc_commands.py) or listed, with why
not and what checks it instead, in doc_commands.NOT_RUN; nothing else is in either."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import doc_commands
from doc_commands import NOT_RUN, block_commands, blocks, commands, documented, documented_commands

TESTS = Path(__file__).resolve().parent
RUNNERS = {"documented", "documented_shell", "exported"}  # each takes one command's literal text first


def run_by_tests() -> tuple[dict[str, list[str]], list[str]]:
    """command -> "tests/x.py:LINE" of each literal call that runs it; and the calls whose command is not a
    literal (they cannot be checked here, so they are errors)."""
    runs: dict[str, list[str]] = {}
    unreadable = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("doc_commands.py", "test_doc_commands.py"):  # the helper and its own tests
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in RUNNERS | {"every_command_in"}:
                continue
            where = f"tests/{path.name}:{node.lineno}"
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                unreadable.append(where)
                continue
            texts = doc_commands.every_command_in(first.value) if name == "every_command_in" else [first.value]
            for text in texts:
                runs.setdefault(text, []).append(where)
    return runs, unreadable


def unaccounted(docs: dict[str, list[str]], runs: dict[str, list[str]], not_run: dict[str, str]) -> list[str]:
    """What is wrong with the accounting, one paragraph a kind: documented commands in neither place, entries no
    document writes any more, commands in both places."""
    missing = [f"{', '.join(where)}: {command}" for command, where in docs.items()
               if command not in runs and command not in not_run]
    stale = [f"{', '.join(runs.get(command, ['NOT_RUN']))}: {command}" for command in [*runs, *not_run]
             if command not in docs]
    both = [f"{', '.join(runs[command])}: {command}" for command in runs if command in not_run]
    return [f"{what}:\n" + "\n".join(lines) for what, lines in (
        ("documented commands that no test runs as written and that tests/doc_commands.py's NOT_RUN does not list "
         "(run each in a test through documented(...), or list it with the reason it cannot run here and the test "
         "that checks it instead)", missing),
        ("commands that tests run or NOT_RUN lists but no document writes any more (README.md, docs/*.md)", stale),
        ("run by a test and also listed in NOT_RUN (drop it from NOT_RUN)", both)) if lines]


def test_every_documented_command_is_run_by_a_test_or_listed_with_its_reason():
    runs, unreadable = run_by_tests()
    assert not unreadable, f"calls whose command is not a literal string: {unreadable}"
    problems = unaccounted(documented_commands(), runs, NOT_RUN)
    assert not problems, "\n\n".join(problems)


def test_a_command_that_nothing_accounts_for_fails_the_accounting():
    """README's old line, whose glob gave `sample` three checkpoints (exit 2), had it stayed: the check names it."""
    old = "python -m dcgan_dist.sample runs/mnist_local/checkpoints/ckpt-*.pt --n 64 --out grid.png"
    runs, _ = run_by_tests()
    now = "\n".join(unaccounted(documented_commands(), runs, NOT_RUN))
    assert old not in now
    written = unaccounted({**documented_commands(), old: ["README.md:36"]}, runs, NOT_RUN)
    assert f"README.md:36: {old}" in written[0] and written[0].startswith("documented commands that no test runs")
    listed = unaccounted(documented_commands(), runs, {**NOT_RUN, old: "why"})
    assert f"NOT_RUN: {old}" in "\n".join(p for p in listed if p.startswith("commands that tests run or NOT_RUN"))


def test_every_reason_names_tests_that_exist():
    for command, reason in NOT_RUN.items():
        assert reason.strip(), command
        for named in re.findall(r"tests/(\w+\.py)", reason):
            assert (TESTS / named).is_file(), f"NOT_RUN[{command!r}] names tests/{named}, which does not exist"


DOC = '''# Title

```bash
python -m a --x 1   # why
# only a comment
ray job submit --working-dir . \\
    -- python -m b c=1 \\
    d=2
a && b # two as one
echo "# not a comment" 'nor # this'
```

```python
import os
```

```console
$ tool --flag \\
    more
output line
```

1. Step one:

   ```sh
   indented fence inside a list item
   ```

2. Step two, in an indented block:

       aws s3 sync a b
       # or: gcloud storage rsync a b

   and a paragraph of the item.

- a list item
    whose continuation is indented four, not code

Top level:

    plain indented block

```
output of a program, not a command
```
'''


def test_the_doc_reader_finds_fences_indented_blocks_continuations_and_comments():
    assert [command for _, command in commands(DOC)] == [
        "python -m a --x 1",
        "ray job submit --working-dir . -- python -m b c=1 d=2",
        "a && b",
        "echo \"# not a comment\" 'nor # this'",
        "tool --flag more",
        "indented fence inside a list item",
        "aws s3 sync a b",
        "plain indented block",
    ]
    assert [language for _, language, _ in blocks(DOC)] == ["bash", "python", "console", "sh", "indented",
                                                             "indented", ""]
    assert dict((c, n) for n, c in commands(DOC))["ray job submit --working-dir . -- python -m b c=1 d=2"] == 6
    assert block_commands("bash", ["a \\", "", "b"]) == [(0, "a"), (2, "b")]


def test_documented_gives_the_argv_of_a_documented_command_and_refuses_any_other():
    command = next(c for c in documented_commands() if re.fullmatch(r"python [\w./ -]+", c))
    argv = documented(command, "x=1")
    assert argv == [sys.executable, *command.split()[1:], "x=1"]
    with pytest.raises(AssertionError, match="no document writes"):
        documented("python -m dcgan_dist.train --no-such-doc-command")
