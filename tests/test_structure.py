"""The shape of the package, as the architecture issue defines it: small functions, one-job modules, no reaching
into another module's private names, tag keys in one place. Each check names what breaks the rule."""
import ast, re
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "mlflow_nb"
MODULES = sorted(p for p in PKG.glob("*.py") if not p.name.startswith("_"))
MAX_FUNCTION_LINES, MAX_MODULE_LINES, MAX_LINE = 40, 400, 120


def _code_lines(path: Path) -> list[str]:
    "The module's lines without nbdev's cell markers and the generated header."
    return [l for l in path.read_text().splitlines() if not l.startswith("# %% ")]


def _all_lines(path: Path) -> set[int]:
    "Line numbers of the `__all__ = [...]` statement nbdev writes."
    node = next((n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", "") == "__all__" for t in n.targets)), None)
    return set(range(node.lineno, node.end_lineno + 1)) if node else set()


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_short(path):
    tree = ast.parse(path.read_text())
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(tree)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_and_lines_are_short(path):
    lines = _code_lines(path)
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines (split it: one noun per module)"
    generated = _all_lines(path)  # nbdev wraps __all__ at 120 characters after its own 10-character prefix
    wide = [i + 1 for i, l in enumerate(path.read_text().splitlines()) if len(l) > MAX_LINE and i + 1 not in generated]
    assert not wide, f"{path.name}: lines over {MAX_LINE} characters: {wide[:10]}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    bad = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mlflow_nb")
           for a in n.names if a.name.startswith("_")]
    bad += [f"{n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
            and not n.attr.startswith("__") and isinstance(n.value, ast.Name) and n.value.id in {m.stem for m in MODULES}]
    assert not bad, f"{path.name} uses private names of other modules: {bad}"


def _string_constants(tree):
    "String constants that are not docstrings nor logger names."
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
           and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "getLogger":
            skip.update(id(a) for a in node.args)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip: yield node.value


@pytest.mark.parametrize("path", [m for m in MODULES if m.name != "core.py"], ids=lambda p: p.name)
def test_tag_keys_and_error_lines_live_in_core(path):
    text, tree = path.read_text(), ast.parse(path.read_text())
    tags = sorted({s for s in _string_constants(tree) if re.match(r"^mlflow_nb\.[a-z_]", s) and " " not in s})
    assert not tags, f"{path.name} spells tag keys itself (use the constants in core): {tags}"
    assert ".splitlines()[0]" not in text, f"{path.name}: use core.error_line for the first line of an error"


def test_config_reads_well():
    offenders = [f"{p.relative_to(ROOT)}:{i + 1}" for p in [*MODULES, *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
                 for i, l in enumerate(p.read_text().splitlines()) if re.search(r"\.model\.model(?![_\w])", l) and "test_structure" not in p.name]
    assert not offenders, f"cfg.model.model is gone (cfg.model.estimator): {offenders}"


def _notebook(path: Path) -> str:
    "The notebook a module is exported from, as its header names it (`00_core`, `02a_settings`, ...)."
    return re.search(r"File to edit: \.\./nbs/(\S+)\.ipynb", path.read_text()).group(1)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_import_only_what_comes_before_them(path):
    "The package reads top to bottom: a notebook uses modules of notebooks that sort before it, never after."
    order = {p.stem: _notebook(p) for p in MODULES}
    tree = ast.parse(path.read_text())
    used = {(n.module or "").split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.level == 1 or (n.module or "").startswith("mlflow_nb."))}
    later = sorted(m for m in used if m in order and order[m] > order[path.stem])
    assert not later, f"{path.name} ({order[path.stem]}) imports modules of later notebooks: {later}"


# -- notebooks at nbdev granularity: a symbol per export cell, its docments, its demonstration ----------------------

NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("[0-9]*.ipynb"))


def _cells(nb: Path) -> list[dict]:
    import json
    return [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str: return "".join(cell["source"])


def _exported(src: str) -> bool: return bool(re.search(r"^#\|\s*export\b", src, re.M))


def _public_defs(src: str) -> list[str]:
    return [n for n in re.findall(r"^(?:async )?(?:def|class) (\w+)", src, re.M) if not n.startswith("_")]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_public_parameters_have_docments(path):
    "Every parameter of a public function, method or constructor says what it is, in a comment on its line."
    lines, tree, bare = path.read_text().splitlines(), ast.parse(path.read_text()), []
    for node in tree.body:
        fns = [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            fns += [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and (not f.name.startswith("_") or f.name == "__init__")]
        for fn in (f for f in fns if not f.name.startswith("_") or f.name == "__init__"):
            args = [a for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
            bare += [f"{fn.name}({a.arg})" for a in args if "#" not in lines[a.lineno - 1]]
    assert not bare, f"{path.name}: parameters without a docment: {bare}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_one_public_symbol_per_export_cell_then_a_kept_demonstration(nb):
    "Each export cell defines one public function or class, and a visible cell with kept output shows it working."
    crowded, undemonstrated, cells = [], [], _cells(nb)
    for i, cell in enumerate(cells):
        src = _source(cell)
        if not _exported(src) or not (names := _public_defs(src)): continue
        if len(names) > 1: crowded.append(names)
        shown = False
        for later in cells[i + 1:]:
            s = _source(later)
            if _exported(s): break
            if re.search(r"^#\|\s*hide\b", s, re.M): continue
            if later.get("outputs"): shown = True; break
        if not shown: undemonstrated += names
    assert not crowded, f"{nb.name}: export cells with several public symbols: {crowded}"
    assert not undemonstrated, f"{nb.name}: public symbols without a kept demonstration after them: {undemonstrated}"
