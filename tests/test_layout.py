"""The package's import graph, read from the source (nothing is imported): no circle inside ds_face, and
ds_face does not depend on data_prep (the converters depend on ds_face's shard format, not the reverse).
docs/layout.md names every module of ds_face/ and data_prep/, in an order the imports follow,
and nothing that does not exist.

Every import counts, also one inside a function: a lazy import still ties the two modules together.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ds_face", "data_prep")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def all_modules() -> dict[str, Path]:
    return {name: path for package in PACKAGES for name, path in modules(package).items()}


def imported_names(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports: ``from a.b import c`` is a.b.c where that is a module, else a.b."""
    known = all_modules()
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".")
                package = package[:len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def ds_face_graph() -> dict[str, set[str]]:
    known = modules("ds_face")
    return {name: {m for m in imported_names(name, path) if m in known and m != name}
            for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_inside_ds_face():
    cycle = find_cycle(ds_face_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_ds_face_does_not_import_data_prep():
    importers = {name for name, path in modules("ds_face").items()
                 if any(m == "data_prep" or m.startswith("data_prep.") for m in imported_names(name, path))}
    assert importers == set(), f"ds_face modules importing data_prep: {sorted(importers)}"


def layout_entries() -> list[str]:
    """The paths docs/layout.md lists, in order: the first word of each line of its (first) code block."""
    block = (ROOT / "docs" / "layout.md").read_text().split("```")[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_the_layout_page_names_every_module_and_nothing_that_does_not_exist():
    listed = layout_entries()
    assert len(listed) == len(set(listed)), "listed twice: " + ", ".join(p for p in listed if listed.count(p) > 1)
    assert [p for p in listed if not (ROOT / p).exists()] == [], "named in docs/layout.md, not in the tree"
    tree = {str(path.relative_to(ROOT)) for path in all_modules().values()}
    assert sorted(tree - set(listed)) == [], "modules missing from docs/layout.md"


def test_the_layout_page_is_in_import_order():
    known = all_modules()
    position = {module_name(ROOT / p): i for i, p in enumerate(layout_entries()) if module_name(ROOT / p) in known}
    late = [f"{name} imports {other}, listed below it" for name, i in position.items()
            for other in sorted(imported_names(name, known[name]))
            if other in position and other != name and position[other] > i]
    assert late == []
