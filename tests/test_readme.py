"""The README tells the truth: CI runs its set-up commands, and every script it and its docs/ pages name exists and
has --help."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n+```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _rehearsal_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Before you rent a GPU", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^HF_HUB_OFFLINE=1 python -m pytest -m rehearsal$", section, re.M).group(0)


def test_ci_runs_exactly_the_readme_setup_commands_then_the_rehearsal_it_names():
    ci = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [*_setup_commands(), _rehearsal_command()]


def test_every_page_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    pages = re.findall(r"\]\((docs/[\w-]+\.md)\)", readme)
    assert len(pages) >= 8 and all((ROOT / page).is_file() for page in pages), pages
    unlinked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")} - set(pages)
    assert not unlinked, unlinked


def test_every_script_named_in_the_readme_and_docs_has_help(capsys, monkeypatch):
    text = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    scripts = sorted(set(re.findall(r"scripts/(\w+\.py)", text)))
    assert {"prepare_nsd.py", "extract_features.py", "fit_maps.py", "reconstruct.py"} <= set(scripts)
    # one as a real command, the rest in this process (starting a Python per script is most of the cost)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / scripts[0]), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage:" in run.stdout, scripts[0]
    for script in scripts[1:]:
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
        assert done.value.code in (0, None) and "usage:" in capsys.readouterr().out, script


def test_the_readme_header_is_a_space_config_the_hub_accepts():
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py" and (ROOT / data["app_file"]).exists()
    assert data["python_version"] == "3.11" and data["suggested_hardware"].startswith("zero-")
    # the model is preloaded at build time, safetensors only (no multi-GB .ckpt)
    repo, files = data["preload_from_hub"][0].split(" ")
    assert repo == data["models"][0] and "unet/diffusion_pytorch_model.safetensors" in files.split(",")
    assert not any(name.endswith(".ckpt") for name in files.split(","))
    # the Hub refuses binary files pushed without LFS/Xet: the repo's images and weights are marked
    rules = (ROOT / ".gitattributes").read_text()
    assert "*.png filter=lfs" in rules and "*.safetensors filter=lfs" in rules
