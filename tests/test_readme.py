"""The README tells the truth: CI runs its set-up commands, and every script it names exists and has --help."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n+```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_setup_commands():
    ci = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == _setup_commands()


def test_every_script_named_in_the_readme_has_help():
    readme = (ROOT / "README.md").read_text()
    scripts = sorted(set(re.findall(r"scripts/(\w+\.py)", readme)))
    assert {"prepare_nsd.py", "extract_features.py", "fit_maps.py", "reconstruct.py"} <= set(scripts)
    for script in scripts:
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
        assert run.returncode == 0 and "usage:" in run.stdout, script
