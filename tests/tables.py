"""Read back the plain-text tables of `gsq_hf.eval.report.format_table` (for the tests of what they show)."""

from __future__ import annotations


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the first table in ``text`` as {header: cell}; columns are where the dash line's runs are.

    The table ends at the first line that does not fit its columns (notes, legend, other output)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "} and i > 0)
    spans, start = [], 0
    for run in lines[rule].split("  "):
        spans.append((start, start + len(run)))
        start += len(run) + 2
    gaps = [end for _, end in spans[:-1]]
    headers = [lines[rule - 1][a:b].strip() for a, b in spans]
    rows = []
    for line in lines[rule + 1:]:
        if len(line) < spans[-1][0] or any(line[g:g + 2] != "  " for g in gaps):
            break
        rows.append({h: line[a:b].strip() for h, (a, b) in zip(headers, spans, strict=True)})
    return rows
