"""The package's shape: wings stacked in the method's order, imports running only downward, and no cycles.

brainldm's ground floor (presets, validation, ...) imports no wing; ``data`` imports only the ground; ``ldm`` and
``decoding`` stand side by side on ``data`` and never import each other; ``reconstruction`` (the test-set job) sits on
both; ``analysis`` on all of them; ``offline`` (the synthetic world, toy) imports the product and the product never
imports it, nor names what it provides, except the app's ``demo`` on top.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brainldm"
# each wing with the wings it may import (the ground floor, "", is open to all)
MAY_IMPORT = {
    "": set(),
    "data": {""},
    "ldm": {"", "data"},
    "decoding": {"", "data"},
    "reconstruction": {"", "data", "ldm", "decoding"},
    "analysis": {"", "data", "ldm", "decoding", "reconstruction"},
    "offline": {"", "data", "ldm", "decoding", "reconstruction", "analysis"},
    "demo": {"", "data", "ldm", "decoding", "reconstruction", "analysis", "offline"},
}


def module_name(path: Path) -> str:
    return ".".join(("brainldm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "demo" if module == "brainldm.demo" else ""


def brainldm_imports(path: Path, modules: set[str]) -> set[str]:
    """Every brainldm module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brainldm"):
            assert node.level == 0, f"{path}: relative import; brainldm imports its modules by their full names"
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("brainldm")}
    return found - {"brainldm"}


def package_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: brainldm_imports(path, set(paths)) for name, path in paths.items()}


def test_wings_import_only_downward():
    wrong = [
        f"{name} ({wing(name) or 'ground'}) imports {other} ({wing(other) or 'ground'})"
        for name, imports in package_graph().items()
        for other in imports
        if wing(other) != wing(name) and wing(other) not in MAY_IMPORT[wing(name)]
    ]
    assert not wrong, wrong


def test_the_ground_floor_is_the_only_open_floor():
    assert set(MAY_IMPORT) - {""} == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | {"demo"}


def test_sibling_imports_stand_at_the_top_of_each_module():
    inside = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        inside += [
            f"{path.relative_to(PACKAGE)}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("brainldm") and id(node) not in top
        ]
    assert not inside, inside


def test_brainldm_modules_import_each_other_without_cycles():
    imports = package_graph()
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for other in sorted(imports.get(name, set()) - {name}):
            if other in path:
                cycles.append(" -> ".join(path[path.index(other) :] + [other]))
            elif other in imports:
                visit(other, path + [other])

    for name in sorted(imports):
        visit(name, [name])
    assert not cycles, cycles[:5]


def offline_names() -> dict[str, set[str]]:
    """What the offline wing provides, each name with the spellings that would name it: every model it registers
    (``tiny``, ``toy``, ``random-sd14``, ...: as written, capitalised or as a constant's TINY), the ``random-`` prefix
    they share, pycortex's demo subject ``S1`` that the offline subjects live in, and the synthetic world's animals (as
    its captions write them: "ZEBRA" is a paper)."""
    from brainldm.ldm import registry
    from brainldm.offline.synthetic import ANIMALS, OFFLINE_SPACE

    models = {name for kind in registry.KINDS for name in registry.names(kind)} | {"random-"}
    names = {name: {name, name.capitalize(), name.upper()} for name in models}
    return names | {OFFLINE_SPACE.subject: {OFFLINE_SPACE.subject}} | {animal: {animal} for animal in ANIMALS}


def named_in(line: str, spellings: set[str]) -> bool:
    """Whether one of ``spellings`` stands in ``line`` as a word of its own (underscores split words: TOY_DIR names
    toy; a name ending in "-" is a prefix)."""
    line = re.sub(r"finfo\([^)]*\)\.tiny", "", line)  # torch's smallest positive float is not the offline model
    return any(
        re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}{'' if s.endswith('-') else '(?![A-Za-z0-9])'}", line)
        for s in spellings
    )


def test_the_product_names_no_offline_thing():
    """Nothing outside offline/ and demo.py names what the offline wing provides: not in code, strings, comments or
    docstrings. The product's loaders know those models only through the registry the offline wing fills."""
    names = offline_names()
    assert {"tiny", "toy", "random-sd14", "S1", "zebra"} <= set(names)  # the check checks something
    outside = ("offline", "demo.py")
    product = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] not in outside]
    wrong = [
        f"{path.relative_to(PACKAGE)}:{number}: {name!r} in {line.strip()[:80]!r}"
        for path in product
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for name, spellings in sorted(names.items())
        if named_in(line, spellings)
    ]
    assert not wrong, "\n".join(wrong)
