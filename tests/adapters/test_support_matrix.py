"""docs/support.md and the README cannot drift from the code: their tables list exactly what is registered."""

import itertools
import re
from pathlib import Path

from gsq_hf.adapters import ADAPTERS
from gsq_hf.adapters.unsupported import REFUSED

ROOT = Path(__file__).resolve().parents[2]


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading`` (header and separator rows dropped)."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table[2:]]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_support_matrix_lists_exactly_the_registered_adapters():
    rows = table_rows((ROOT / "docs" / "support.md").read_text(encoding="utf-8"), "## Supported families")
    listed = {names(row[0])[0]: tuple(names(row[1])) for row in rows}
    assert listed == {family: cls.mixer_classes for family, cls in ADAPTERS.items()}
    units = {names(row[0])[0]: row[4] for row in rows}
    assert units == {family: cls.unit for family, cls in ADAPTERS.items()}
    test_files = {name.split("[")[0] for row in rows for name in names(row[6]) if ".py" in name}
    assert test_files and all((ROOT / "tests" / "adapters" / name).is_file() for name in test_files)


def test_support_matrix_lists_exactly_the_refused_layers():
    rows = table_rows((ROOT / "docs" / "support.md").read_text(encoding="utf-8"), "## Refused families")
    listed = {row[0]: tuple(names(row[1])) for row in rows}
    assert listed == {entry.kind: entry.mixer_classes for entry in REFUSED}


def test_readme_summary_lists_the_registered_families():
    rows = table_rows((ROOT / "README.md").read_text(encoding="utf-8"), "## Supported models")
    assert {family for row in rows for family in names(row[0])} == set(ADAPTERS)
