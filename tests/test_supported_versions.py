"""The transformers range that pyproject.toml declares is the range tests/run.sh tests: the whole suite runs on its
newest release, the parity subset on its oldest, and nothing newer or older is admitted."""

from __future__ import annotations

import re
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared_range() -> SpecifierSet:
    """The version specifier of the `transformers` requirement in pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\s*"transformers([<>=!~,.0-9 ]+)",\s*$', text, re.MULTILINE)
    assert match, "pyproject.toml has no transformers requirement with a version range"
    return SpecifierSet(match.group(1))


def run_sh_default(variable: str) -> Version:
    """The default of TRANSFORMERS_HIGHEST / TRANSFORMERS_LOWEST in tests/run.sh."""
    text = (ROOT / "tests" / "run.sh").read_text()
    match = re.search(rf'^{variable}="\$\{{{variable}:-([0-9.]+)\}}"$', text, re.MULTILINE)
    assert match, f"tests/run.sh sets no default for {variable}"
    return Version(match.group(1))


def test_declared_range_is_the_tested_range() -> None:
    declared = declared_range()
    lowest, highest = run_sh_default("TRANSFORMERS_LOWEST"), run_sh_default("TRANSFORMERS_HIGHEST")
    assert lowest in declared and highest in declared
    # The bounds stop at the tested minor releases: the minor release after the newest tested one and the one before
    # the oldest are refused.
    assert Version(f"{highest.major}.{highest.minor + 1}.0") not in declared
    assert Version(f"{lowest.major}.{lowest.minor - 1}.0") not in declared


def test_installed_transformers_is_in_the_declared_range() -> None:
    installed = Version(transformers.__version__)
    assert installed in declared_range(), (
        f"transformers {installed} is outside the range pyproject.toml declares ({declared_range()}): when the suite "
        "passes on it, raise the bound and TRANSFORMERS_HIGHEST in tests/run.sh together."
    )
