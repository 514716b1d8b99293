"""The package's shape: no import cycles between brainldm's modules (lazy imports inside functions included)."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brainldm"


def test_brainldm_modules_import_each_other_without_cycles():
    sources = {path.stem: path.read_text() for path in PACKAGE.glob("*.py")}
    imports = {
        name: {m for m in re.findall(r"from \.(\w+) import|from \. import (\w+)", text) for m in m if m} & set(sources)
        for name, text in sources.items()
    }
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for other in sorted(imports[name] - {name}):
            if other in path:
                cycles.append(" -> ".join(path[path.index(other) :] + [other]))
            else:
                visit(other, path + [other])

    for name in sorted(sources):
        visit(name, [name])
    assert not cycles, cycles[:5]
