"""Harvest the docstrings of a Python interpreter's standard library.

This is lmpipe's built-in default corpus: it needs no network and no data files, only the interpreter itself.
`harvest` returns one `DocObject` per documented module, class, function, method and property, named by the
fully qualified name a user would import it by (`json.dumps`, `collections.Counter.most_common`, `os.path.join`).

The harvest runs in a child interpreter started with ``-I -S -B -W ignore``, so that importing hundreds of modules
(some of which print, change global state or could hang) cannot affect the calling process, so that third-party
packages cannot shadow the standard library (``-S`` keeps site-packages and its ``.pth`` hooks out, e.g.
setuptools' ``distutils`` replacement), and without writing bytecode caches into the standard library (``-B``).
The child's program is this very file, fed to ``python -`` on stdin: it therefore imports nothing from lmpipe, must
only ever import the standard library at module level, and must stay valid for older interpreters (3.8+) that
`harvest(python=...)` may be pointed at. The same code runs with ``python -m lmpipe.stdlib_docs [MODULE ...]``,
which prints the JSON lines the parent reads: one object per row, then an end marker with the row count.

Naming rules, applied in the child where every object is at hand:

* A module reached under several names is emitted once, preferring the public alias it is imported through
  (``os.path`` rather than ``posixpath``).
* A class or function belongs to the module named by its ``__module__`` when that module is public and exposes it.
  Members of helper modules that the documentation tells users not to import directly are credited to the module
  that re-exports them (`posix` to `os`, `genericpath` to `os.path`, `pyexpat` to `xml.parsers.expat`).
* Objects whose ``__module__`` is private (``_functools``, ``_collections_abc``) or that their own module does not
  expose (``types.FunctionType``, whose module says ``builtins``) are adopted by one harvested module that exposes
  them, preferring the module whose name matches the private one (``_json`` -> ``json``), then one of the same
  package (``_frozen_importlib_external`` -> ``importlib.machinery``), then one that lists the name in ``__all__``,
  then the shallowest module. A module with ``__all__`` adopts only names listed there or from its own package, so
  its incidental imports (functools' ``RLock`` from ``_thread``) are not taken for its API. Objects owned by a public
  module outside the harvest are left to that module's harvest, so a partial harvest never names them differently
  from a full one.
* Class members are the public methods, class/static methods and properties in the class's own ``__dict__`` that
  have a docstring of their own (not one identical to the member they override). Dunder and private names are
  skipped. An object reached under several names (an alias in a class, a function stored in another class) is
  emitted once, under the name matching its ``__qualname__``. A public alias of a special method
  (``keyword.iskeyword``, a bound ``__contains__``) is skipped: its docstring describes the special method.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["HARVEST_VERSION", "KINDS", "DocObject", "HarvestError", "harvest", "python_fingerprint"]

logger = logging.getLogger(__name__)

#: Bumped whenever the harvesting rules change: put it in cache keys next to `python_fingerprint()`.
HARVEST_VERSION = 1

#: The values `DocObject.kind` takes.
KINDS = ("module", "class", "function", "method", "property")

# Importing these is the side effect: `antigravity` opens a web browser, `this` prints the Zen of Python.
_SIDE_EFFECT_MODULES = frozenset({"antigravity", "this"})
# Applications rather than library API; some idlelib and turtledemo modules start a GUI when imported.
_SKIPPED_TREES = frozenset({"idlelib", "turtledemo"})
# Helper modules whose public members are documented, and used, through another module.
_FACADES = {"posix": "os", "nt": "os", "genericpath": "os.path", "pyexpat": "xml.parsers.expat"}
# Seconds one import may take in the child before it is abandoned (where SIGALRM exists).
_MODULE_TIMEOUT = 20.0
# How long `python_fingerprint` waits for another interpreter to describe itself.
_FACTS_TIMEOUT = 60.0
# Descriptor types whose instances document an attribute of a class.
_PROPERTY_TYPES: tuple[type, ...] = (
    property,
    types.DynamicClassAttribute,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
) + ((functools.cached_property,) if hasattr(functools, "cached_property") else ())


@dataclass(frozen=True)
class DocObject:
    """One documented object of the standard library."""

    qualname: str  # fully qualified public name, e.g. "collections.Counter.most_common"
    kind: str  # one of KINDS
    module: str  # the module the object is credited to, e.g. "collections"
    docstring: str  # cleaned with inspect.cleandoc and stripped; never empty


class HarvestError(RuntimeError):
    """The harvesting child process could not start, failed, timed out or sent malformed output."""


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def harvest(modules: Sequence[str] | None = None, python: str | None = None, timeout: float = 300) -> list[DocObject]:
    """Harvest docstrings in a child interpreter and return them sorted by qualname.

    `modules` lists exactly the modules to walk (no submodules are added); None walks the whole public standard
    library, subpackages included, minus test suites, applications and modules imported for their side effects.
    Modules that fail to import, or (where SIGALRM exists) take more than 20 s to, are skipped; requested ones with
    a logged warning. `python` is the interpreter to harvest (default: this one); `timeout` bounds the whole child
    run in seconds. Raises `HarvestError` when the child cannot start, fails, times out or sends malformed output.
    """
    if isinstance(modules, str):
        raise TypeError("modules must be a sequence of module names, not a single string")
    if modules is not None:
        modules = list(modules)
        if not modules:
            return []
        bad = [name for name in modules if not isinstance(name, str) or not name or name.startswith("-")]
        if bad:
            raise ValueError(f"invalid module names: {bad!r}")
    args = ["--module-timeout", repr(min(_MODULE_TIMEOUT, float(timeout)))]
    args += ["--", *modules] if modules is not None else []
    lines = _run_child(python, args, timeout).splitlines()

    rows: list[DocObject] = []
    trailer: dict[str, Any] | None = None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if trailer is not None:
                raise ValueError("data after the end marker")
            if "end" in record:
                trailer = record
                continue
            row = DocObject(record["qualname"], record["kind"], record["module"], record["docstring"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HarvestError(f"malformed line {number} from the harvesting child: {exc}") from None
        if row.kind not in KINDS or not all(isinstance(value, str) for value in vars(row).values()):
            raise HarvestError(f"malformed row {number} from the harvesting child: {row!r}")
        rows.append(row)
    if trailer is None or trailer.get("rows") != len(rows):
        raise HarvestError("the harvesting child's output is incomplete (no end marker or a wrong row count)")

    skipped: dict[str, str] = trailer.get("skipped") or {}
    logger.debug("stdlib harvest: %d rows, %d modules skipped", len(rows), len(skipped))
    for name in modules or ():
        if name in skipped:
            logger.warning("stdlib harvest skipped module %s: %s", name, skipped[name])
    rows.sort(key=lambda row: row.qualname)
    return rows


def python_fingerprint(python: str | None = None) -> str:
    """Return a short key for an interpreter, like ``cpython-3.11.7-1a2b3c4d5e6f``.

    The readable part is the implementation and version; the hash covers the full build string, platform and
    installation prefix, which decide what the standard library holds. `python` defaults to this interpreter.
    """
    if python is None:
        facts = _interpreter_facts()
        major, minor, micro, level, serial = facts["version"]
    else:
        try:
            facts = json.loads(_run_child(python, ["--facts"], _FACTS_TIMEOUT))
            major, minor, micro, level, serial = facts["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HarvestError(f"malformed interpreter facts from {python!r}: {exc}") from None
    suffix = "" if level == "final" else {"alpha": "a", "beta": "b", "candidate": "rc"}.get(level, level) + str(serial)
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return f"{facts['implementation']}-{major}.{minor}.{micro}{suffix}-{digest}"


@functools.lru_cache(maxsize=1)
def _own_source() -> str:
    """This module's source, which is the child's whole program."""
    try:
        return inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError) as exc:
        raise HarvestError(f"cannot read the source of {__name__} to run it in a child: {exc}") from None


def _run_child(python: str | None, args: list[str], timeout: float) -> str:
    """Run this module's source in an isolated child interpreter and return its stdout."""
    executable = python or sys.executable
    if not executable:
        raise HarvestError("no Python interpreter to run: sys.executable is empty and no python was given")
    command = [executable, "-I", "-S", "-B", "-W", "ignore", "-", *args]
    # Without a display, a module that tries to open a window fails fast instead of showing one.
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    # An empty working directory, so nothing there can shadow a standard module even in interpreters where -I
    # still puts the current directory on sys.path.
    with tempfile.TemporaryDirectory(prefix="lmpipe-stdlib-") as cwd:
        try:
            done = subprocess.run(
                command,
                input=_own_source().encode("utf-8"),
                capture_output=True,
                timeout=timeout,
                cwd=cwd,
                env=env,
                check=False,
            )
        except OSError as exc:
            raise HarvestError(f"cannot start Python interpreter {executable!r}: {exc}") from exc
        except subprocess.TimeoutExpired:
            raise HarvestError(f"harvesting child {executable!r} timed out after {timeout:g} s") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise HarvestError(f"harvesting child {executable!r} exited with status {done.returncode}:\n{tail}")
    try:
        return done.stdout.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HarvestError(f"harvesting child {executable!r} wrote non-JSON output: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Child side. Everything below runs inside the isolated interpreter and only ever sees the standard library.
# ---------------------------------------------------------------------------------------------------------------


def _interpreter_facts() -> dict[str, Any]:
    """What identifies this interpreter's standard library, as JSON-ready values."""
    version = sys.version_info
    return {
        "implementation": sys.implementation.name,
        "version": [version.major, version.minor, version.micro, version.releaselevel, version.serial],
        "build": sys.version,
        "platform": sysconfig.get_platform(),
        "prefix": os.path.realpath(sys.base_prefix),
    }


def _is_public(name: str) -> bool:
    return all(part and not part.startswith("_") for part in name.split("."))


def _is_excluded(name: str) -> bool:
    """Test suites (test, unittest.test, lib2to3.tests, idlelib.idle_test, ...) and applications."""
    parts = name.split(".")
    return parts[0] in _SKIPPED_TREES or any(part.startswith("test") or part.endswith("_test") for part in parts)


def _top_level_names() -> list[str]:
    """Public top-level standard library modules that are worth importing."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:
        # Before 3.10 there is no list: take the built-in modules plus what the standard library directories hold.
        found = set(sys.builtin_module_names)
        roots = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
        roots |= {os.path.join(root, "lib-dynload") for root in set(roots)}
        found.update(info.name for info in pkgutil.iter_modules(sorted(roots)))
        names = found
    return sorted(name for name in names if _is_public(name) and not _is_excluded(name))


class _ImportTimeout(BaseException):
    """Raised by SIGALRM inside an import that takes too long."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _ImportTimeout("import timed out")


def _import_guarded(name: str, seconds: float) -> tuple[types.ModuleType | None, str]:
    """Import a module; return it, or None and why not. Never raises and, where SIGALRM exists, never hangs."""
    alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread() and seconds > 0
    previous = signal.signal(signal.SIGALRM, _on_alarm) if alarm else None
    try:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, seconds)
        return importlib.import_module(name), ""
    except BaseException as exc:  # modules may raise anything on import, SystemExit included
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _import_modules(requested: Sequence[str] | None, seconds: float) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Import the requested modules, or discover and import the public standard library when None.

    Returns (name, module) pairs in a deterministic order, and the skipped names with the reason.
    """
    discover = requested is None
    pending = list(reversed(_top_level_names() if requested is None else list(requested)))
    loaded: list[tuple[str, Any]] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    while pending:  # depth first, in name order
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.split(".")[0] in _SIDE_EFFECT_MODULES:
            skipped[name] = "not imported: importing it has side effects"
            continue
        module, error = _import_guarded(name, seconds)
        if module is None:
            skipped[name] = error
            continue
        loaded.append((name, module))
        path = getattr(module, "__path__", None)
        if discover and path is not None:
            try:
                children = [info.name for info in pkgutil.iter_modules(path, name + ".")]
            except Exception as exc:  # an odd __path__ only loses that package's submodules
                skipped[name + ".*"] = f"{type(exc).__name__}: {exc}"
                children = []
            pending.extend(sorted((c for c in children if _is_public(c) and not _is_excluded(c)), reverse=True))
    if discover:
        loaded.extend(_public_aliases(loaded))
    return loaded, skipped


def _public_aliases(loaded: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Public names under which a module sits as an attribute of a loaded package, like ``os.path``."""
    parents = dict(loaded)
    found = []
    for name in sorted(sys.modules):
        module = sys.modules.get(name)
        parent, _, leaf = name.rpartition(".")
        if name in parents or parent not in parents or not _is_public(name) or _is_excluded(name):
            continue
        is_alias = isinstance(module, types.ModuleType) and module.__name__ != name
        if is_alias and vars(parents[parent]).get(leaf) is module:
            found.append((name, module))
    return found


def _module_names(loaded: list[tuple[str, Any]]) -> dict[int, str]:
    """One name per module object (keyed by id), preferring an alias it is imported through."""
    chosen: dict[int, str] = {}

    def rank(name: str, module: Any) -> tuple[bool, int, str]:
        return (name == getattr(module, "__name__", name), name.count("."), name)

    for name, module in loaded:
        current = chosen.get(id(module))
        if current is None or rank(name, module) < rank(current, module):
            chosen[id(module)] = name
    return chosen


def _own_doc(obj: Any) -> str:
    """The object's own cleaned docstring, or "" when it has none (or only its type's)."""
    try:
        doc = obj.__doc__
        if not isinstance(doc, str):
            return ""
        # A descriptor or callable instance without a docstring shows its type's one instead.
        if not inspect.isclass(obj) and doc == getattr(type(obj), "__doc__", None):
            return ""
        return inspect.cleandoc(doc).strip()
    except Exception:  # odd objects may raise from attribute access
        return ""


@functools.lru_cache(maxsize=None)  # noqa: UP033 - functools.cache is 3.9+ and the child may be older
def _module_members(module: Any) -> tuple[tuple[str, Any], ...]:
    """Public classes and routines in a module's namespace, read without triggering lazy attributes."""
    try:
        namespace = dict(vars(module))
    except TypeError:
        return ()
    members = []
    for attr in sorted(namespace):
        obj = namespace[attr]
        try:
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                members.append((attr, obj))
        except Exception:  # an object whose type cannot be inspected is not documentable
            continue
    return tuple(members)


@functools.lru_cache(maxsize=None)  # noqa: UP033 - see _module_members
def _exported(module: Any) -> frozenset[str]:
    """The names a module lists in ``__all__`` (empty when it has none)."""
    names = getattr(module, "__all__", None)
    try:
        return frozenset(name for name in names if isinstance(name, str)) if names is not None else frozenset()
    except TypeError:
        return frozenset()


def _squash(name: str) -> str:
    return name.replace("_", "").replace(".", "").lower()


def _related(defining: str, module_name: str) -> bool:
    """Whether a module's top-level package is named in the defining module's name (_json, email._parseaddr)."""
    return module_name.split(".")[0] in defining.replace(".", "_").split("_")


def _describes_dunder(name: str, obj: Any) -> bool:
    """A public alias of a special method (``iskeyword = frozenset(...).__contains__``) carries its docstring."""
    own = getattr(obj, "__name__", None)
    return isinstance(own, str) and own.startswith("__") and own.endswith("__") and not name.startswith("__")


def _home(obj: Any, candidates: list[tuple[str, str, Any]], names: dict[int, str]) -> tuple[str, str] | None:
    """Pick the (module name, attribute) an object is emitted under, or None when another harvest owns it.

    `candidates` are the (module name, attribute, module) triples of harvested modules exposing the object.
    A module with ``__all__`` adopts only names listed there or objects from a related private module, so that
    its incidental imports (functools' ``RLock`` from ``_thread``) are not taken for its API.
    """
    try:
        defining = obj.__module__
    except Exception:  # a raising __module__ descriptor: treat the module as unknown
        defining = None
    if not isinstance(defining, str):
        defining = ""
    own_name = getattr(obj, "__name__", None)
    owner_name = _FACADES.get(defining, defining)
    owner = sys.modules.get(owner_name) if owner_name and _is_public(owner_name) else None
    if isinstance(owner, types.ModuleType):
        attrs = [attr for attr, member in _module_members(owner) if member is obj]
        if attrs:
            if id(owner) not in names:
                return None
            exported = _exported(owner)
            return names[id(owner)], min(attrs, key=lambda attr: (attr != own_name, attr not in exported, attr))

    def rank(candidate: tuple[str, str, Any]) -> tuple[bool, bool, bool, int, bool, str, str]:
        module_name, attr, module = candidate
        return (
            _squash(module_name) != _squash(defining),
            not _related(defining, module_name),
            attr not in _exported(module),
            module_name.count("."),
            attr != own_name,
            module_name,
            attr,
        )

    admitted = [
        (module_name, attr, module)
        for module_name, attr, module in candidates
        if not _exported(module) or attr in _exported(module) or _related(defining, module_name)
    ]
    if not admitted:
        return None
    module_name, attr, _ = min(admitted, key=rank)
    return module_name, attr


def _unwrap_member(raw: Any) -> tuple[str, Any] | None:
    """The kind and documented object of a class ``__dict__`` entry, or None when it is neither."""
    if isinstance(raw, (classmethod, staticmethod)):
        return "method", raw.__func__
    if isinstance(raw, _PROPERTY_TYPES):
        return "property", raw
    if inspect.isroutine(raw) and not inspect.isclass(raw):
        return "method", raw
    return None


def _class_members(cls: type) -> Iterator[tuple[str, str, Any, str]]:
    """(name, kind, object, docstring) for the documented public members defined in the class itself."""
    try:
        namespace = dict(vars(cls))
        bases = [vars(base) for base in cls.__mro__[1:]]
    except Exception:  # a class with a broken namespace or MRO documents nothing we can read
        return
    for name in sorted(namespace):
        if name.startswith("_"):  # private and dunder members alike
            continue
        try:
            unwrapped = _unwrap_member(namespace[name])
            if unwrapped is None:
                continue
            kind, target = unwrapped
            doc = _own_doc(target)
            if not doc or _describes_dunder(name, target):
                continue
            # An override that repeats the overridden member's docstring documents nothing new.
            inherited = (_unwrap_member(base[name]) for base in bases if name in base)
            if any(base_member is not None and _own_doc(base_member[1]) == doc for base_member in inherited):
                continue
        except Exception:  # one member that cannot be inspected must not cost the rest of the class
            continue
        yield name, kind, target, doc


def _collect(requested: Sequence[str] | None, seconds: float) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Import, walk and name everything; return the rows sorted by qualname and the skipped modules."""
    loaded, skipped = _import_modules(requested, seconds)
    names = _module_names(loaded)
    modules = [(names[id(module)], module) for _, module in loaded]
    modules = sorted({id(module): (name, module) for name, module in modules}.values(), key=lambda item: item[0])

    # Every harvested module that exposes each class or routine, keyed by the object's id (all stay alive here).
    objects: dict[int, Any] = {}
    candidates: dict[int, list[tuple[str, str, Any]]] = {}
    for module_name, module in modules:
        for attr, obj in _module_members(module):
            objects[id(obj)] = obj
            candidates.setdefault(id(obj), []).append((module_name, attr, module))

    # (object id) -> (rank, row); the best-ranked name wins when one object is reachable under several.
    best: dict[int, tuple[tuple[bool, int, str], dict[str, str]]] = {}

    def offer(key: Any, local: str, module_name: str, kind: str, doc: str, obj: Any) -> None:
        qualname = f"{module_name}.{local}" if local else module_name
        rank = (local != getattr(obj, "__qualname__", local), qualname.count("."), qualname)
        if doc and (id(key) not in best or rank < best[id(key)][0]):
            best[id(key)] = (rank, {"qualname": qualname, "kind": kind, "module": module_name, "docstring": doc})

    for module_name, module in modules:
        offer(module, "", module_name, "module", _own_doc(module), module)
    for key, obj in objects.items():
        home = _home(obj, candidates.get(key, []), names)
        if home is None:
            continue
        module_name, attr = home
        is_class = inspect.isclass(obj)
        if _describes_dunder(attr, obj):
            continue
        offer(obj, attr, module_name, "class" if is_class else "function", _own_doc(obj), obj)
        if is_class:
            for name, kind, target, doc in _class_members(obj):
                offer(target, f"{attr}.{name}", module_name, kind, doc, target)

    rows: dict[str, dict[str, str]] = {}
    for _, row in sorted(best.values(), key=lambda item: (item[1]["qualname"], KINDS.index(item[1]["kind"]))):
        # Two objects under one name (a package attribute shadowing a submodule): keep the first, say so.
        if row["qualname"] in rows:
            skipped[row["qualname"] + " (" + row["kind"] + ")"] = "name already taken"
        else:
            rows[row["qualname"]] = row
    return list(rows.values()), skipped


def _claim_stdout() -> Any:
    """Return a private text stream on the real stdout, and send fd 1 (so print and C code) to the null device.

    Harvested modules may write to stdout when imported; that must not corrupt the JSON lines.
    """
    sys.stdout.flush()
    private = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    return os.fdopen(private, "w", encoding="ascii", newline="\n")


def _main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child: print one JSON object per row, then an end marker with the row count."""
    parser = argparse.ArgumentParser(
        prog="python -m lmpipe.stdlib_docs",
        description="Print the standard library's docstrings as JSON lines (qualname, kind, module, docstring).",
    )
    parser.add_argument("modules", nargs="*", help="modules to walk, exactly (default: the whole standard library)")
    parser.add_argument("--module-timeout", type=float, default=_MODULE_TIMEOUT, help="seconds allowed per import")
    parser.add_argument("--facts", action="store_true", help="print facts identifying this interpreter instead")
    args = parser.parse_args(argv)
    out = _claim_stdout()
    if args.facts:
        out.write(json.dumps(_interpreter_facts(), sort_keys=True) + "\n")
    else:
        rows, skipped = _collect(args.modules or None, args.module_timeout)
        for row in rows:
            out.write(json.dumps(row, sort_keys=True) + "\n")
        out.write(json.dumps({"end": True, "rows": len(rows), "skipped": skipped}, sort_keys=True) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
