"""A newcomer's wrong inputs to ``gsq-hf``: exit code 2 and one stderr line naming the file or value, no traceback.

Each case is a bad file or directory (made in ``tmp_path``) given to ``gsq_hf.cli.main`` in-process; the
check is the whole contract: exit 2, exactly one non-empty stderr line, the path named, no "Traceback".
"""

from __future__ import annotations

import pytest

from gsq_hf.cli import main

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xf0\x9f"


def _error_line(capsys, *args: str) -> str:
    """Run ``gsq-hf eval ARGS --quiet``; assert the bad-input contract; return the one error line."""
    code = main(["eval", *args, "--context", "16", "--max-tokens", "64", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gsq-hf eval: error: "), lines[0]
    return lines[0]


# -- config files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, content, message", [
    ("list.yaml", "- a\n- b\n", "holds a YAML list, not a mapping of fields; accepted: a YAML mapping"),
    ("syntax.yaml", "policy: [static\n", "is not valid YAML at line 2, column 1"),
    ("tag.yaml", "x: !!python/object:os.system {}\n", "only plain YAML is accepted"),
    ("bad.json", '{"policy": ', "is not valid JSON: line 1, column 12"),
    ("list.json", "[1, 2]", "holds a JSON list, not a mapping"),
])
def test_bad_config_file(tmp_path, capsys, file, content, message):
    path = tmp_path / file
    path.write_text(content)
    line = _error_line(capsys, "--config", str(path))
    assert f"config file {str(path)!r}" in line and message in line, line


# -- datasets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, content, message", [
    ("image.txt", PNG, "is not UTF-8 text (byte 0x89 at offset 0); accepted: 'builtin'"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xf0\x9f\x98", "is not UTF-8 text"),
    ("empty.txt", b" \n", "the evaluation text is empty: dataset"),
    ("empty.jsonl", b'{"text": ""}\n\n', "the evaluation text is empty: dataset"),
    ("body.jsonl", b'{"body": "x"}\n', 'body.jsonl:1 has no string "text" field'),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "broken.jsonl:2 is not valid JSON"),
])
def test_bad_dataset_file(tmp_path, capsys, file, content, message):
    path = tmp_path / file
    path.write_bytes(content)
    line = _error_line(capsys, "--dataset", str(path))
    assert str(path) in line and message in line, line


def test_dataset_directory(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("not .txt/.raw")
    assert f"directory {str(tmp_path)!r} holds no .txt or .raw file" in _error_line(capsys, "--dataset", str(tmp_path))
    (tmp_path / "a.txt").write_bytes(PNG)
    assert f"{str(tmp_path / 'a.txt')!r} is not UTF-8 text" in _error_line(capsys, "--dataset", str(tmp_path))
