"""The README as a newcomer reads it: every Python block runs as written on a CPU, printing
what its comments say, and the Configuration section names every CROSSATTN_* variable."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
# `print(...)   # expected output` lines: the comment is what the call prints.
PRINTED = re.compile(r"^print\(.*\)\s+#\s*(.+)$")


def _needs(code: str) -> list[str]:
    return ["transformers"] if "transformers" in code or "crossattn.models" in code else []


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4  # API, modules, Hugging Face, models


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_python_block_runs_as_written(index, capsys, monkeypatch, tmp_path):
    code = BLOCKS[index]
    for module in _needs(code):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    expected = [m.group(1).strip() for line in code.splitlines() if (m := PRINTED.match(line.strip()))]
    assert printed == expected


def _code_variables() -> set[str]:
    found = set()
    for path in [*ROOT.glob("crossattn/**/*.py"), *ROOT.glob("kernels/*.py"), ROOT / "setup.py"]:
        found |= set(re.findall(r"\bCROSSATTN_[A-Z0-9_]+\b", path.read_text()))
    return found


def test_configuration_section_lists_every_environment_variable():
    m = re.search(r"^## Configuration\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, "README.md has no '## Configuration' section"
    section = m.group(1)
    variables = _code_variables()
    assert "CROSSATTN_BACKEND" in variables  # the grep finds them
    missing = sorted(v for v in variables if f"`{v}" not in section)
    assert not missing, f"undocumented in README's Configuration: {missing}"
    assert "~/.cache/crossattn" in section and "--data-dir" in section
    assert "metrics.jsonl" in section and "checkpoint.pt" in section
