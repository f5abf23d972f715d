#!/usr/bin/env python3
"""Print the import structure of layerpack/ and runtime/layerpack_runtime/ (standard library only).

    python scripts/import_graph.py [--max-lines 400] [ROOT]

Sections: every module with its line count; import cycles between the project's own modules, once for
module-level imports (run when the module is imported) and once counting function-level (lazy) imports
too; modules over --max-lines lines; cross-module use of private names (`from x import _y`, or `m._y`
on an imported module `m`); and imports that point the wrong way (the runtime importing the toolkit).
Reads the source with `ast`; imports nothing from the project, so it runs on a broken tree too."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass

PACKAGES = (("layerpack", "layerpack"), ("layerpack_runtime", os.path.join("runtime", "layerpack_runtime")))
LOWER, UPPER = "layerpack_runtime", "layerpack"  # the runtime must never import the toolkit


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body: runs on call, not on import


def discover(root: str) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the project's packages."""
    modules = {}
    for package, rel in PACKAGES:
        base = os.path.join(root, rel)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            parts = [package] + os.path.relpath(dirpath, base).split(os.sep)
            parts = [p for p in parts if p != "."]
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                dotted = ".".join(parts if name == "__init__.py" else parts + [name[:-3]])
                modules[dotted] = os.path.join(dirpath, name)
    return modules


def is_package(modules: dict[str, str], name: str) -> bool:
    return modules.get(name, "").endswith("__init__.py")


def resolve_from(modules: dict[str, str], module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module named by `from X import ...` inside `module`."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not is_package(modules, module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def project_target(modules: dict[str, str], name: str | None) -> str | None:
    """The longest project module that `name` is or lies in (a.b.c -> a.b when c is an attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


class ImportVisitor(ast.NodeVisitor):
    def __init__(self, modules: dict[str, str], module: str):
        self.modules, self.module = modules, module
        self.depth = 0  # function nesting; class bodies run at import, so they do not count
        self.edges: list[Edge] = []
        self.private: list[tuple[int, str, str]] = []  # (line, target module, name)
        self.aliases: dict[str, str] = {}  # local name -> project module bound to it

    def _edge(self, target: str | None, line: int) -> None:
        if target and target != self.module:
            self.edges.append(Edge(self.module, target, line, self.depth > 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            target = project_target(self.modules, alias.name)
            self._edge(target, node.lineno)
            if target and alias.asname:
                self.aliases[alias.asname] = target

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = resolve_from(self.modules, self.module, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            if sub in self.modules:  # `from pkg import submodule`
                self._edge(sub, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
                continue
            target = project_target(self.modules, base)
            self._edge(target, node.lineno)
            if target and target != self.module and alias.name.startswith("_") and not alias.name.startswith("__"):
                self.private.append((node.lineno, target, alias.name))

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            target = self.aliases[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and target != self.module:
                self.private.append((node.lineno, target, node.attr))
        self.generic_visit(node)


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); only components with more than one module (cycles)."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        if e.target not in graph[e.source]:
            graph[e.source].append(e.target)
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def print_cycles(title: str, components: list[list[str]], edges: list[Edge]) -> None:
    print(f"\n== {title}: {len(components)} ==")
    for members in components:
        inside = set(members)
        print(f"  cycle among {len(members)} modules: {', '.join(members)}")
        for e in sorted(set(edges), key=lambda e: (e.source, e.target, e.line)):
            if e.source in inside and e.target in inside:
                kind = "function-level" if e.lazy else "module-level"
                print(f"    {e.source} -> {e.target}  (line {e.line}, {kind})")


@dataclass
class Report:
    modules: dict[str, str]                       # dotted name -> path
    lines: dict[str, int]
    edges: list[Edge]
    private: list[tuple[str, int, str, str]]      # (module, line, target module, private name)

    def cycles(self, lazy: bool) -> list[list[str]]:
        """Module-level cycles (lazy=False), or the cycles that only function-level imports close."""
        names = sorted(self.modules)
        eager = strongly_connected(names, [e for e in self.edges if not e.lazy])
        if not lazy:
            return eager
        return [c for c in strongly_connected(names, self.edges) if set(c) not in [set(e) for e in eager]]

    def upward(self) -> list[tuple[str, str, int]]:
        """Imports of the toolkit by the runtime (must be none)."""
        return sorted({(e.source, e.target, e.line) for e in self.edges
                       if e.source.split(".")[0] == LOWER and e.target.split(".")[0] == UPPER})


def analyze(root: str) -> Report:
    modules = discover(os.path.abspath(root))
    lines, edges, private = {}, [], []
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines[name] = len(text.splitlines())
        visitor = ImportVisitor(modules, name)
        visitor.visit(ast.parse(text, filename=path))
        edges += visitor.edges
        private += [(name, *p) for p in visitor.private]
    return Report(modules, lines, edges, private)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    parser.add_argument("--max-lines", type=int, default=400)
    args = parser.parse_args(argv)
    report = analyze(args.root)
    if not report.modules:
        print(f"error: no layerpack/ or runtime/layerpack_runtime/ under {args.root}", file=sys.stderr)
        return 2
    modules, lines, edges = report.modules, report.lines, report.edges

    print("== modules (lines) ==")
    for package, _ in PACKAGES:
        members = [n for n in modules if n == package or n.startswith(package + ".")]
        print(f"  {package}: {len(members)} modules, {sum(lines[n] for n in members)} lines")
        for n in members:
            print(f"    {lines[n]:5d}  {n}")

    # Cycles that exist only because of function-level imports: a lazy import hides them from
    # Python but not from the design.
    print_cycles("import cycles, module-level imports only", report.cycles(lazy=False), [e for e in edges if not e.lazy])
    print_cycles("import cycles that need function-level imports (all imports counted)", report.cycles(lazy=True), edges)

    names = sorted(modules)
    big = [n for n in names if lines[n] > args.max_lines]
    print(f"\n== modules over {args.max_lines} lines: {len(big)} ==")
    for n in sorted(big, key=lambda n: -lines[n]):
        print(f"    {lines[n]:5d}  {n}")

    print(f"\n== cross-module use of private names: {len(report.private)} ==")
    for source, line, target, attr in sorted(report.private):
        print(f"    {source}:{line} uses {target}.{attr}")

    upward = report.upward()
    print(f"\n== runtime -> toolkit imports (must be none): {len(upward)} ==")
    for source, target, line in upward:
        print(f"    {source}:{line} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
