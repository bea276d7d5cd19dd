"""README stays true: the config table is the generated one; the commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

from fedmpi import config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(name: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert m, f"README lacks the {name} section"
    return m.group(1)


def test_config_table_is_generated():
    assert section("config-reference").strip() == config.reference_markdown().strip(), (
        "README's config table is stale: regenerate with python -m fedmpi.config --markdown")


def test_every_key_is_documented():
    missing = [k for k, _, meaning in config.reference_rows() if not meaning]
    assert not missing, f"config keys without a #: comment: {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci
    assert 'pip install -e ".[test,mpich,analysis,tensorboard]"' in README
    assert '-e ".[test,mpich,analysis,tensorboard]"' in ci


def test_the_run_command_installs_what_the_analysis_scripts_need():
    run = next(line for line in README.splitlines() if "&& python -m fedmpi.train" in line)
    assert '".[mpich,analysis]"' in run, run


def test_front_page_points_nowhere_outside_the_repository():
    front = README[:README.index("## Running")]
    assert "../" not in front and len(front.splitlines()) < 90
