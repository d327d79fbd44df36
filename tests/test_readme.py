"""README.md (and the docs pages it sends users to) is true as written.

* Every ```python block of README.md and of each page in ``PAGES`` runs, top to bottom, in one namespace per page,
  against the built-in model (offline, a few seconds each). Blocks fenced ```python-nocheck are shown but not run
  (they need a GPU or the network); they are the only ones skipped.
* The one substitution: the Hub id ``"state-spaces/mamba-130m-hf"`` (a quoted string literal, passed to
  ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``) is replaced in the snippet text
  by the path of ``gsq_hf.eval.builtin.BUILTIN_MODEL_DIR``, the tiny Mamba (and its tokenizer) shipped with the
  package. Nothing is pre-defined in the namespace: the snippets make their own model, tokenizer and
  ``input_ids``.
* The snippets run in a scratch directory, as if from the repository root: it links the checkout's ``configs/``,
  and files the snippets write (``save_pretrained``, plots) land there.
* Every ``gsq-hf ...`` command line in the code blocks of those pages (also ``-m gsq_hf.cli ...`` under
  torchrun / accelerate) parses with ``gsq_hf.cli``'s argparse parser; every local path the README links or
  mentions, and every local link of the pages (anchors included), exists; the example config loads.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from gsq_hf.cli import DEFAULT_CONFIGS, _parser
from gsq_hf.config import list_presets, resolve_config
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.policies import POLICY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE_CONFIG = ROOT / "configs" / "examples" / "my-config.yaml"
HUB_ID = '"state-spaces/mamba-130m-hf"'
# pages with runnable snippets, and the optional packages ("gsq_hf[plot]", ...) their snippets import
PAGES = {
    "README.md": (),
    "docs/configuration.md": (),
    "docs/evaluation.md": ("matplotlib", "evaluate"),
    "docs/integrations.md": ("bitsandbytes",),
}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str, language: str) -> list[tuple[int, str]]:
    """(line number, source) of each fenced block of ``language`` in ``page``, in order."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


# -- the snippets run ---------------------------------------------------------------------------------------
@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory that looks like the repository root to the snippets (configs/ linked in)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    registered = dict(POLICY_CONFIGS)  # a snippet may register a policy kind: leave the registry as found
    yield tmp_path
    POLICY_CONFIGS.clear()
    POLICY_CONFIGS.update(registered)


@pytest.mark.parametrize("page", list(PAGES))
def test_python_snippets_run(page, scratch):
    for module in PAGES[page]:
        pytest.importorskip(module)
    snippets = blocks(page, "python")
    assert snippets, f"{page} has no ```python block"
    namespace: dict = {"__name__": "__main__"}
    for line, source in snippets:
        code = source.replace(HUB_ID, repr(str(BUILTIN_MODEL_DIR)))
        exec(compile(code, f"{page}:{line}", "exec"), namespace)  # a failure names the page and the line
    if page == "README.md":  # what the README's first snippet claims
        assert type(namespace["out"].cache).__name__ == "GSQCache"
        assert not namespace["gsq_hf"].is_patched(namespace["model"])


def test_only_the_marked_blocks_are_skipped():
    """A snippet is run unless fenced ```python-nocheck: no other python fence slips past the runner."""
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        fences = {m.group(1) for m in FENCE.finditer(text)}
        assert fences <= {"python", "python-nocheck", "bash", "yaml", ""}, (page, fences)


# -- the commands parse ---------------------------------------------------------------------------------------
def cli_commands(page: str) -> list[list[str]]:
    """The arguments after ``gsq-hf`` (or ``-m gsq_hf.cli``) of every command line in the page's bash blocks."""
    commands = []
    for _, source in blocks(page, "bash"):
        for line in source.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["gsq-hf"]:
                    commands.append(words[1:])
                elif "gsq_hf.cli" in words and words[words.index("gsq_hf.cli") - 1] == "-m":
                    commands.append(words[words.index("gsq_hf.cli") + 1:])
    return commands


@pytest.mark.parametrize("page", list(PAGES))
def test_cli_command_lines_parse(page):
    commands = cli_commands(page)
    if page == "README.md":
        assert ["eval"] in commands and {c[0] for c in commands} == {"eval", "memory", "recall", "sweep"}
    for args in commands:
        try:
            _parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page}: `gsq-hf {' '.join(args)}` does not parse (see the usage error above)")


def test_readme_names_the_default_configs():
    """"`gsq-hf eval` with no arguments ... under eight configs — `fp32 int8 int4 ...`" stays what the CLI runs."""
    text = " ".join(README.read_text(encoding="utf-8").split())  # the list may wrap
    assert f"`{' '.join(DEFAULT_CONFIGS)}`" in text
    assert "under eight configs" in text and len(DEFAULT_CONFIGS) == 8


# -- paths and the example config -----------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def check_link(page: Path, target: str) -> str | None:
    """Why the link ``target`` from ``page`` is broken, or None."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return f"{target}: no such file"
    if anchor and file.suffix == ".md":
        headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.MULTILINE)
        if anchor not in {slug(h) for h in headings}:
            return f"{target}: no heading with anchor #{anchor} in {file.name}"
    return None


@pytest.mark.parametrize("page", list(PAGES))
def test_local_links_exist(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert not [why for link in local if (why := check_link(ROOT / page, link))]


def test_paths_the_readme_mentions_exist():
    text = README.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"(?<![\w./-])((?:docs|configs|scripts|tests|gsq_hf)/[\w./*-]*[\w*/])", text))
    assert {"docs/results.md", "configs/examples/my-config.yaml"} <= mentioned
    missing = [path for path in sorted(mentioned) if not (list(ROOT.glob(path)) if "*" in path else
                                                          (ROOT / path).exists())]
    assert not missing


def test_example_config_loads_and_is_not_a_preset():
    config = resolve_config(str(EXAMPLE_CONFIG))
    assert (config.name, config.policy.kind) == ("my-config", "gate")
    assert "my-config" not in list_presets()
    shown = [yaml.safe_load(source) for _, source in blocks("README.md", "yaml")]
    assert shown == [yaml.safe_load(EXAMPLE_CONFIG.read_text())]  # the README shows the file as shipped


def test_readme_stays_short():
    """The README is the first hour; the rest lives in docs/ (a target of 12 KB)."""
    assert len(README.read_bytes()) <= 12 * 1024
