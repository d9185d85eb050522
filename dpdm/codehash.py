"""Which `dpdm` modules a command runs, found from the code, and a hash of them.

Snakemake does not track imported Python code. The workflow gives every rule a param
`code=code_hash("<command>")`, the content hash of exactly the modules that
`python -m dpdm <command>` imports, directly or through other modules: a change to any
of them reruns the rule (Snakemake's params trigger), a change to any other module does
not. The module set is derived from the import statements, never from a hand-kept list,
so it cannot go stale when a module starts importing another one: cli.py except the
functions `cmd_<other>` and `args_<other>` of the other commands, then every import of
every module reached (including imports inside functions: conservative).
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

from dpdm.artifacts import DPDMError

PACKAGE_DIR = Path(__file__).resolve().parent
ALWAYS = ("__init__", "__main__", "cli")  # what `python -m dpdm` itself runs


def _module_files(name: str) -> list[Path]:
    """The files of dpdm module `name`: [name.py], or every .py of sub-package `name`
    (a package counts as one unit: a change to any of its modules reruns its users)."""
    if (PACKAGE_DIR / f"{name}.py").is_file():
        return [PACKAGE_DIR / f"{name}.py"]
    if (PACKAGE_DIR / name / "__init__.py").is_file():
        return sorted((PACKAGE_DIR / name).glob("*.py"))
    return []


def _dpdm_imports(tree: ast.AST) -> set[str]:
    """Top-level dpdm modules named by the import statements anywhere in `tree`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dpdm.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` or `from .x import y`
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module == "dpdm":  # `from dpdm import x` (x a module or a name in __init__)
                found |= {a.name for a in node.names} | {"__init__"}
            elif node.module and node.module.startswith("dpdm."):
                found.add(node.module.split(".")[1])
    return {name for name in found if _module_files(name)}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@lru_cache(maxsize=None)
def modules_of(command: str) -> tuple[str, ...]:
    """The dpdm modules `python -m dpdm <command>` can import, sorted."""
    cli = _parse(PACKAGE_DIR / "cli.py")
    func = f"cmd_{command.replace('-', '_')}"
    if not any(isinstance(n, ast.FunctionDef) and n.name == func for n in cli.body):
        raise DPDMError(f"dpdm has no command '{command}' (no function {func} in dpdm/cli.py)")
    # cli.py without the other commands: its module level, its helpers (e.g. _settings,
    # which imports dpdm.config), this command's `cmd_<command>` and `args_<command>`
    # (options that only this command builds).
    own = {func, f"args_{command.replace('-', '_')}"}
    mine = [n for n in cli.body if not (isinstance(n, ast.FunctionDef) and n.name.startswith(("cmd_", "args_"))
                                        and n.name not in own)]
    todo = _dpdm_imports(ast.Module(body=mine, type_ignores=[])) | set(ALWAYS)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name == "cli":  # cli: only its module level and this command count
            seen.add(name)
            continue
        seen.add(name)
        for path in _module_files(name):
            todo |= _dpdm_imports(_parse(path)) - seen
    return tuple(sorted(seen))


def code_hash(command: str) -> str:
    """sha256 (16 hex digits) over the names and contents of modules_of(command)."""
    h = hashlib.sha256()
    for name in modules_of(command):
        for path in _module_files(name):
            h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
