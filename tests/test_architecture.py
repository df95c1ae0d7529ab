"""The walls of the house, read from the source: which postbote module may import which.

The import graph is built with `ast` from agent/ (installed as ``postbote``) and plugins/ (``postbote.plugins``),
without importing any of it. An import is one of three kinds:
- at module level: runs when the module is imported;
- in a function: runs when the function does (still a dependency, but no part of an import cycle);
- under ``if TYPE_CHECKING:``: for annotations only, never runs.
Each wall is one test; a failure names the module, the line and the import that breaks it.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import postbote

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = {"postbote": ROOT / "agent", "postbote.plugins": ROOT / "plugins"}

POP3_CLIENT = "postbote.plugins.pop3.client"
IMAP_CLIENT = ("postbote.plugins.imap.client", "postbote.plugins.imap.wire")  # the client and its parser
# The POP3 plugin's modules and the sign-in modules it shares with the sources and destinations to come.
SIGN_IN = ("postbote.plugins.signin.sasl", "postbote.plugins.signin.oauth2", "postbote.plugins.signin.authorize")
NETWORK = ("ssl", "socket", "http", "urllib", "postbote.smtp", "postbote.tls", "postbote.plugins")
DELIVERY_STATE_AND_PLUGINS = ("postbote.state", "postbote.poller", "postbote.handling", "postbote.pluginmanager",
                              "postbote.hookspecs", "postbote.plugins", "pluggy")
# Reading a source's keys (its plugin's parse_source) loads no network code either: not even the plugin's own.
SOURCE_SETTINGS = ("postbote.plugins.pop3.settings", "postbote.plugins.imap.settings", "postbote.plugins.signin.server",
                   "postbote.plugins.signin.settings", "postbote.plugins.signin.passwords",
                   "postbote.plugins.signin.oauth2_settings")
SOURCE_NETWORK = ("ssl", "socket", "http", "urllib.request", "urllib.error", "postbote.smtp", "postbote.tls",
                  POP3_CLIENT, "postbote.plugins.pop3.login", "postbote.plugins.pop3.mailbox", *IMAP_CLIENT,
                  "postbote.plugins.imap.login", "postbote.plugins.imap.mailbox", "postbote.plugins.imap.idle",
                  *SIGN_IN)


class When(enum.Enum):
    MODULE_LEVEL = "at module level"
    IN_FUNCTION = "in a function"
    TYPE_CHECKING = "under TYPE_CHECKING"


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, e.g. postbote.config
    target: str  # the module imported, resolved: ``from postbote import settings`` imports postbote.yaml_reader
    line: int
    when: When
    spelled: str  # the statement as written, for the failure message
    face_name: str | None = None  # set for ``from postbote import <name>`` where name is on the public face

    @property
    def runs(self) -> bool:
        return self.when is not When.TYPE_CHECKING

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}, {self.when.value}): {self.spelled}"


def within(target: str, prefixes: Iterable[str]) -> bool:
    return any(target == prefix or target.startswith(prefix + ".") for prefix in prefixes)


@cache
def modules() -> dict[str, Path]:
    """{module name: source file} for every module of agent/ and plugins/."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, When]]:
    def walk(node: ast.AST, when: When) -> Iterator[tuple[ast.Import | ast.ImportFrom, When]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, when
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, When.TYPE_CHECKING if when is When.TYPE_CHECKING else When.IN_FUNCTION)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), When.TYPE_CHECKING)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), when)
            else:
                yield from walk(child, when)

    yield from walk(tree, When.MODULE_LEVEL)


def _absolute(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = modules()[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports_of(importer: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node, when in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, alias.name, node.lineno, when, f"import {alias.name}")
            continue
        source = _absolute(importer, node)
        for alias in node.names:
            spelled = f"from {'.' * node.level}{node.module or ''} import {alias.name}"
            submodule = f"{source}.{alias.name}"
            if submodule in modules():
                yield Import(importer, submodule, node.lineno, when, spelled)
            elif source == "postbote" and alias.name in postbote._LAZY:
                # a name on the face: importing it loads the module behind it
                yield Import(importer, postbote._LAZY[alias.name][0], node.lineno, when, spelled, alias.name)
            elif source == "postbote" and alias.name in postbote.__all__:  # __version__, defined by the face itself
                yield Import(importer, source, node.lineno, when, spelled, alias.name)
            else:
                yield Import(importer, source, node.lineno, when, spelled)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(found for name, path in modules().items() for found in _imports_of(name, path))


def imports_by(importers: Iterable[str]) -> list[Import]:
    wanted = set(importers)
    return [found for found in all_imports() if found.importer in wanted]


def core_modules() -> list[str]:
    return [name for name in modules() if not within(name, ["postbote.plugins"])]


def built_in_plugins() -> list[str]:
    return [name for name in modules() if name.startswith("postbote.plugins.")]


def report(broken: list[Import]) -> str:
    return "\n".join(str(found) for found in broken)


# --- the walls ------------------------------------------------------------------------------------------------------

def test_the_core_never_imports_a_built_in_plugin() -> None:
    """The plugin manager loads built-ins by name (importlib), which is how the core may reach them."""
    broken = [found for found in imports_by(core_modules()) if within(found.target, ["postbote.plugins"])]
    assert not broken, "the core imports a built-in plugin:\n" + report(broken)


def test_the_config_imports_nothing_of_the_network() -> None:
    broken = [found for found in imports_by(["postbote.config", "postbote.yaml_reader"])
              if found.runs and within(found.target, NETWORK)]
    assert not broken, "the config imports network code:\n" + report(broken)


def test_the_source_settings_import_nothing_of_the_network() -> None:
    broken = [found for found in imports_by(SOURCE_SETTINGS) if found.runs and within(found.target, SOURCE_NETWORK)]
    assert not broken, "reading the POP3 keys imports network code:\n" + report(broken)
    assert set(SOURCE_SETTINGS) <= set(modules())


def test_the_pop3_client_knows_nothing_of_delivery_state_or_plugins() -> None:
    """Nothing of delivery, state or the plugin machinery, and of the plugins only the shared sign-in code."""
    broken = [found for found in imports_by([POP3_CLIENT])
              if within(found.target, DELIVERY_STATE_AND_PLUGINS) and not within(found.target, SIGN_IN)]
    assert not broken, "the POP3 client imports delivery, state or plugin code:\n" + report(broken)
    assert POP3_CLIENT in modules()  # the wall names a module that exists


def test_the_imap_client_knows_nothing_of_delivery_state_or_plugins() -> None:
    """The one IMAP client, shared by the IMAP source and the IMAP destination: of the plugins only its parser."""
    broken = [found for found in imports_by(list(IMAP_CLIENT))
              if within(found.target, DELIVERY_STATE_AND_PLUGINS) and not within(found.target, IMAP_CLIENT)]
    assert not broken, "the IMAP client imports delivery, state or plugin code:\n" + report(broken)
    assert set(IMAP_CLIENT) <= set(modules())




def test_built_in_plugins_import_only_the_public_face_and_each_other() -> None:
    def allowed(found: Import) -> bool:
        return (not within(found.target, ["postbote"]) or found.face_name is not None
                or within(found.target, ["postbote.plugins"]))

    broken = [found for found in imports_by(built_in_plugins()) if not allowed(found)]
    assert not broken, "a built-in plugin reaches past `from postbote import ...`:\n" + report(broken)


def test_the_face_lazily_names_only_what_exists() -> None:
    """The wall above trusts the face; every name on it must resolve, and ``__all__`` must list exactly them."""
    assert sorted(postbote.__all__) == sorted(["__version__", *postbote._LAZY])
    missing = [name for name, (module, inner) in postbote._LAZY.items()
               if module not in modules() or not _defines(modules()[module], inner)]
    assert not missing, f"the face names what its module does not define: {missing}"


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return True
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return True
        if isinstance(node, ast.ImportFrom) and any((alias.asname or alias.name) == name for alias in node.names):
            return True
    return False


# Cycles that exist today in files owned by other parts of issue 12 (each set is one cycle's modules).
KNOWN_CYCLES: list[set[str]] = []


def test_no_import_cycles_among_core_modules() -> None:
    """Only imports that run when a module is imported count: TYPE_CHECKING-only and function-local ones do not."""
    core = set(core_modules())
    graph: dict[str, set[str]] = {name: set() for name in core}
    for found in imports_by(core):
        if found.when is When.MODULE_LEVEL:
            graph[found.importer] |= {target for target in _with_parents(found.target) if target in core}
    cycles = [cycle for cycle in strongly_connected(graph) if len(cycle) > 1 and cycle not in KNOWN_CYCLES]
    details = [sorted(f"{found}" for found in imports_by(cycle)
                      if found.when is When.MODULE_LEVEL and set(_with_parents(found.target)) & cycle)
               for cycle in cycles]
    assert not cycles, "import cycles among core modules:\n" + "\n\n".join("\n".join(lines) for lines in details)


def _with_parents(module: str) -> list[str]:
    """Importing ``postbote.cli.poll`` also runs ``postbote.cli``; the root ``postbote`` runs nothing (lazy face)."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(2, len(parts) + 1)]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
                if lowlink[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


# --- the reader itself ----------------------------------------------------------------------------------------------

def test_the_reader_sees_each_kind_of_import(tmp_path: Path) -> None:
    """The walls are only as good as the reader: a module-level, a function-local and a TYPE_CHECKING import."""
    source = tmp_path / "example.py"
    source.write_text("import socket\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ssl\n"
                      "def f():\n    import http.client\n")
    modules()["postbote.example_for_the_reader"] = source
    try:
        found = {(found.target, found.when) for found in _imports_of("postbote.example_for_the_reader", source)}
    finally:
        del modules()["postbote.example_for_the_reader"]
    assert found == {("socket", When.MODULE_LEVEL), ("typing", When.MODULE_LEVEL), ("ssl", When.TYPE_CHECKING),
                     ("http.client", When.IN_FUNCTION)}


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert [component for component in strongly_connected(graph) if len(component) > 1] == [{"a", "b", "c"}]
