"""The import rules of ARCHITECTURE.md, checked on the source: every ``import`` of every module under
``ernie45/`` (module level and inside functions alike), parsed with ``ast``.

A *part* is a folder of ``ernie45/`` or one of its top-level modules. ``LAYERS`` lists them bottom-up; a
part may import parts of lower layers only (nothing in its own layer but itself, nothing above), and a
part in ``ONLY`` no more than the parts listed there. The test
names the importing file, the line and the forbidden target. ``PENDING`` lists rules that do not hold yet
on this branch (issue 22, points 1-5 remove them); they are reported, not failed, until they hold, and
then the test asks for them to be taken out of ``PENDING``. Separately, the folder-level graph of the
imports that are actually there must have no cycle.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ernie45"

# ARCHITECTURE.md mirrors this table: keep the two the same.
LAYERS: list[set[str]] = [
    {"utils", "assets"},  # helpers and bundled files
    {"config"},  # configs and presets
    {"resolve", "chat_template"},  # model names -> folders (demo, preset, folder, file); Jinja chat templates
    {"tokenizer"},  # text
    {"model"},  # plain torch: the reference every backend is tested against
    {"kernels"},  # native code for the passes above the model (see ONLY: it imports no model code)
    {"quant"},  # quantized weight formats and the quantize swap
    {"accel", "formats", "offload"},  # acceleration pass (module swaps per backend); other weight file formats
    # (GGUF, Paddle); hybrid placement (routed experts in host RAM, the rest on the device)
    {"loading"},  # load_model / save_model: plain or quantized
    {"engine"},  # scheduling, paged KV cache, sampling, outputs; receives its runner
    {"parallel"},  # tp / ep / fsdp applied from outside; the multi-rank runner
    {"serve", "train", "tools"},  # entry points with their own launch glue
    {"cli"},  # verbs -> library calls
    {PACKAGE},  # ernie45/__init__.py: the public names; nothing inside the package imports it
]

ONLY: dict[str, set[str]] = {
    "kernels": {"utils"},  # C and Triton kernels take tensors, never modules: a second backend needs no model code
}
"""Parts that may import less than their layer allows: at most these parts."""

PENDING: set[tuple[str, str]] = set()
"""(importer, target) rules of LAYERS that the lead enables when issue 22's acceleration pass lands."""


def layer_of(part: str) -> int:
    for i, parts in enumerate(LAYERS):
        if part in parts:
            return i
    raise KeyError(part)


def allowed(importer: str, target: str) -> bool:
    return importer == target or target in may_import(importer)


def may_import(part: str) -> set[str]:
    below = set().union(*LAYERS[:layer_of(part)])
    return below & ONLY[part] if part in ONLY else below


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root
    line: int
    module: str  # the importing module, e.g. ernie45.model.model
    target: str  # the imported module, e.g. ernie45.kernels

    @property
    def edge(self) -> tuple[str, str]:
        return part_of(self.module), part_of(self.target)

    def __str__(self) -> str:
        a, b = self.edge
        return f"{self.file}:{self.line} imports {self.target} ({a} -> {b})"


def part_of(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else PACKAGE


def module_name(path: Path, root: Path) -> str:
    names = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def package_imports(root: Path = ROOT) -> list[Import]:
    """Every import of an ``ernie45`` module by an ``ernie45`` module under ``root``, wherever it sits
    (module level, functions, ``if TYPE_CHECKING``). ``from ernie45 import x`` is ``ernie45.x`` when x is a
    module of the package, else the package itself; relative imports are resolved."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    out = []
    for f in files:
        mod = module_name(f, root)
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package of this module, up level - 1
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            else:
                continue
            rel = str(f.relative_to(root))
            for t in dict.fromkeys(targets):  # `from x import a, b` is one import of x
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    out.append(Import(rel, node.lineno, mod, t))
    return out


def violations(imports: list[Import]) -> tuple[list[str], list[Import]]:
    """(errors, imports that break a PENDING rule). Errors name the file, line and forbidden target."""
    errors, pending = [], []
    for imp in imports:
        a, b = imp.edge
        for part in (a, b):
            try:
                layer_of(part)
            except KeyError:
                errors.append(f"{imp}: part {part!r} is not in LAYERS; add it to the table in "
                              f"tests/test_architecture.py and to ARCHITECTURE.md")
        if any(e.startswith(str(imp)) for e in errors):
            continue
        if allowed(a, b):
            continue
        if (a, b) in PENDING:
            pending.append(imp)
            continue
        may = ", ".join(sorted(may_import(a))) or "nothing"
        errors.append(f"{imp}: {a} may not import {b} ({a} may import: {may})")
    return errors, pending


def cycles(imports: list[Import]) -> list[list[str]]:
    """Folder-level cycles (strongly connected components of more than one part) of the actual imports."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        a, b = imp.edge
        if a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges_in(imports: list[Import], comp: list[str]) -> list[str]:
    return [str(i) for i in imports if i.edge[0] in comp and i.edge[1] in comp and i.edge[0] != i.edge[1]]


# ------------------------------------------------------------------------------------------- the rules
def test_every_part_imports_only_lower_layers():
    imports = package_imports()
    assert len(imports) > 100, "the parser found almost no imports: it is broken"
    errors, _ = violations(imports)
    assert not errors, "forbidden imports (see ARCHITECTURE.md):\n" + "\n".join(errors)


def test_pending_rules_still_pending():
    """A PENDING rule that now holds must be enabled (taken out of PENDING), so it stays held."""
    _, pending = violations(package_imports())
    still = {imp.edge for imp in pending}
    done = sorted(PENDING - still)
    assert not done, f"these PENDING rules hold now: remove them from PENDING in tests/test_architecture.py: {done}"


def test_no_folder_level_cycles():
    imports = package_imports()
    found = cycles(imports)
    assert not found, "\n".join(f"cycle {' <-> '.join(c)}:\n  " + "\n  ".join(_edges_in(imports, c)) for c in found)


def test_every_part_is_in_the_table():
    parts = {p.name if p.is_dir() else p.stem for p in (ROOT / PACKAGE).iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    missing = sorted(parts - set().union(*LAYERS))
    assert not missing, f"parts {missing} are in no layer: add them to LAYERS and ARCHITECTURE.md"


def test_architecture_md_mirrors_the_table():
    """Each layer of LAYERS is one line of ARCHITECTURE.md's layer list, in the same order."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| L")]
    got = [{p.strip(" `") for p in row.split("|")[2].split(",")} for row in rows]
    assert got == LAYERS, f"ARCHITECTURE.md's layer table {got} differs from LAYERS {LAYERS}"


# ------------------------------------------------------------------------------------------ the checker
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, src in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    for d in {p.parent for p in (tmp_path / PACKAGE).rglob("*.py")}:
        (d / "__init__.py").touch()
    return tmp_path


def test_checker_names_file_line_and_target_of_a_function_level_import(tmp_path):
    root = _tree(tmp_path, {
        "config.py": "",
        "engine/llm.py": "",
        "model/model.py": "import torch\nfrom ernie45.config import X\n\n\ndef f():\n"
                          "    from ernie45.engine import llm\n",
    })
    errors, _ = violations(package_imports(root))
    assert errors == [f"{os.path.join(PACKAGE, 'model', 'model.py')}:6 imports ernie45.engine.llm (model -> engine): "
                      "model may not import engine (model may import: assets, chat_template, config, resolve, "
                      "tokenizer, utils)"]


def test_checker_resolves_package_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "from ernie45.loading import load_model\n",
        "loading.py": "",
        "kernels/__init__.py": "",
        "serve/app.py": "from ernie45 import kernels\nfrom ernie45 import load_model\nfrom ..engine import llm\n",
        "engine/llm.py": "",
    })
    got = {(i.target, i.edge) for i in package_imports(root) if i.module == "ernie45.serve.app"}
    assert got == {("ernie45.kernels", ("serve", "kernels")), (PACKAGE, ("serve", PACKAGE)),
                   ("ernie45.engine.llm", ("serve", "engine"))}
    errors, _ = violations(package_imports(root))
    assert len(errors) == 1 and "serve may not import ernie45" in errors[0] and ":2 " in errors[0]


def test_checker_finds_cycles_and_unknown_parts(tmp_path):
    root = _tree(tmp_path, {
        "engine/llm.py": "def f():\n    import ernie45.parallel.runner\n",
        "parallel/runner.py": "from ernie45.engine.llm import LLMEngine\n",
        "gadgets/x.py": "import ernie45.model\n",
        "model/__init__.py": "",
    })
    imports = package_imports(root)
    assert cycles(imports) == [["engine", "parallel"]]
    errors, _ = violations(imports)
    assert any("engine may not import parallel" in e for e in errors)
    assert any("'gadgets' is not in LAYERS" in e for e in errors)


def test_pending_rules_are_rules_of_the_table():
    for edge in sorted(PENDING):
        assert not allowed(*edge), f"{edge} is allowed by LAYERS anyway; it does not belong in PENDING"
