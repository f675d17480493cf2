"""The README's quick start is exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    section = ROOT.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_two_commands_run_and_test():
    run, test = quick_start_commands()
    assert run.endswith("python -m gan_tune.search --space balanced")
    assert "pytest" in test and "'.[test]'" in test


def test_ci_runs_the_readme_test_command():
    _, test = quick_start_commands()
    assert any(line.startswith(test) for line in ROOT.joinpath(".ci", "run").read_text().splitlines())
