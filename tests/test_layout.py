"""The package's import graph, read from the source with ast: no cycle, and every import points down the layers.

Function-local imports count like any other: hiding an upward import inside a function is still an upward import.
The layers are the ones dcgan_dist/__init__.py lists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "dcgan_dist"

# Longest prefix wins; the command lines (cli, __main__, sample) sit on top of everything.
RANKS = {
    "dcgan_dist": 0, "dcgan_dist.config": 0, "dcgan_dist.files": 0, "dcgan_dist.pixels": 0,
    "dcgan_dist.limits": -1,
    "dcgan_dist.grids": 1, "dcgan_dist.models": 1,
    "dcgan_dist.checkpoint": 2,
    "dcgan_dist.data": 3,
    "dcgan_dist.distributed": 4,
    "dcgan_dist.shard": 5, "dcgan_dist.evaluate": 5,
    "dcgan_dist.train": 6,
    "dcgan_dist.sample": 7,
}
CLI_RANK = 7
# Imports that the layers allow but the design does not: the loop never knows Ray or the shard tool.
ONLY_FROM = {
    "dcgan_dist.distributed.ray_launch": {"dcgan_dist.train.cli"},
    "dcgan_dist.shard": {"dcgan_dist.train.cli"},  # outside shard/ itself: the built-in set for the default run
}
TORCH_FREE = ("dcgan_dist.data.images", "dcgan_dist.data.manifest", "dcgan_dist.data.storage",
              "dcgan_dist.data.tarread", "dcgan_dist.data.shardset", "dcgan_dist.shard.worker",
              "dcgan_dist.shard.sources", "dcgan_dist.shard.run", "dcgan_dist.shard.cli", "dcgan_dist.files")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """Every dcgan_dist module (and third-party top-level package) that module `name` imports."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name).split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import mod` imports a module, `from mod import f` a name
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return found


def internal_edges(name: str) -> set[str]:
    out = set()
    for target in imports(name):
        if target.startswith("dcgan_dist"):
            assert target in MODULES, f"{name} imports {target}, which does not exist"
            out.add(target)
    return out


def rank(name: str) -> int:
    """The module's layer: its longest prefix in RANKS ("dcgan_dist" itself covers only the package's __init__);
    a module that none covers fails the test, named, instead of landing in some layer by default."""
    if name.rsplit(".", 1)[-1] in ("cli", "__main__"):
        return CLI_RANK
    covering = [p for p in RANKS if name == p or (p != "dcgan_dist" and name.startswith(p + "."))]
    if not covering:
        pytest.fail(f"{name} has no layer: add it (or its part) to RANKS in tests/test_layout.py")
    return RANKS[max(covering, key=len)]


def part(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_every_module_has_a_layer():
    for name in MODULES:
        rank(name)


def test_a_module_outside_every_layer_is_named(monkeypatch):
    monkeypatch.setitem(MODULES, "dcgan_dist.newcomer", ROOT / "newcomer.py")
    with pytest.raises(pytest.fail.Exception, match="dcgan_dist.newcomer has no layer"):
        test_every_module_has_a_layer()


def test_no_import_cycle():
    graph = {name: internal_edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_imports_point_down_the_layers():
    upward = []
    for name in MODULES:
        for target in internal_edges(name):
            same_part = part(target) == part(name) and part(name) != "dcgan_dist"
            if not same_part and rank(target) >= rank(name) and target != "dcgan_dist":
                upward.append(f"{name} (layer {rank(name)}) imports {target} (layer {rank(target)})")
            for guarded, allowed in ONLY_FROM.items():
                inside = target == guarded or target.startswith(guarded + ".")
                if inside and part(name) != part(guarded) and name not in allowed:
                    upward.append(f"{name} imports {target}; only {', '.join(sorted(allowed))} may")
    assert not upward, "\n".join(sorted(upward))


def test_the_loop_never_imports_the_ray_launcher():
    reach, todo = set(), ["dcgan_dist.train.loop"]
    while todo:
        for nxt in internal_edges(todo.pop()) - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert "dcgan_dist.distributed.ray_launch" not in reach
    assert not any(m.startswith("dcgan_dist.shard") for m in reach)


@pytest.mark.parametrize("name", TORCH_FREE)
def test_read_and_write_path_modules_load_without_torch(name):
    """What the shard tool's worker processes load must not pull in torch (seconds per worker start)."""
    reach, todo = {name}, [name]
    while todo:
        current = todo.pop()
        third_party = {t.split(".")[0] for t in imports(current, top_level_only=True)}
        assert not third_party & {"torch", "torchvision", "webdataset"}, f"{current} imports torch at load"
        for nxt in {t for t in imports(current, top_level_only=True) if t in MODULES} - reach:
            reach.add(nxt)
            todo.append(nxt)


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The checker itself: an upward import hidden in a function is reported."""
    planted = ROOT / "data" / "stream.py"
    source = planted.read_text() + "\n\ndef _planted():\n    from ..train import loop  # noqa\n"
    monkeypatch.setitem(MODULES, "dcgan_dist.data.stream", tmp_path / "stream.py")
    (tmp_path / "stream.py").write_text(source)
    edges = internal_edges("dcgan_dist.data.stream")
    assert "dcgan_dist.train.loop" in edges
    assert rank("dcgan_dist.train.loop") > rank("dcgan_dist.data.stream")


def test_readmes_layout_table_names_every_module():
    """A reader finds where a thing lives from README's table: every module of the package is in it."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Benchmarks")]
    modules = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    missing = [str(m) for m in modules if f"`{m.name}`" not in table and f"{m.name}`" not in table
               and f"`{m.stem}`" not in table]
    assert not missing, f"README's layout table leaves out {missing}"


def test_no_function_in_the_package_is_over_60_lines():
    """A function a newcomer must change is read whole: none over 60 lines (docstring and comments included)."""
    import ast

    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
