"""lm-evaluation-harness on a patched model (model ``gsq``, `gsq_hf.eval.lm_eval`) against gsq_hf's own evaluation.

The task (tests/data/lm_eval/gsq_wikitext_heads.yaml) is lm-eval's wikitext task on the heads of three WikiText-2
pages, each a multiple of 64 tokens for the built-in model: with max_length 64 every rolling window lm-eval
forms is full (one token of context, 64 scored), i.e. exactly a `TokenWindows` row of 65 tokens, so lm-eval's
log-likelihoods and `decode_faithful_perplexity` score the same tokens with the same contexts.
"""

from __future__ import annotations

import json
import math
import re
import sys
from functools import partialmethod
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import gsq_hf
from gsq_hf.eval import TokenWindows, decode_faithful_perplexity
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR

pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from gsq_hf.eval import lm_eval as gsq_lm_eval  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "lm_eval"
TASK = "gsq_wikitext_heads"
MAX_LENGTH = 64
MODEL_ARGS = f"pretrained={BUILTIN_MODEL_DIR},device=cpu,max_length={MAX_LENGTH}"
# int8/gsq-gate: lm-eval's multi-token forward stores the quantized state after every token (every_step), as
# stepping does, but a scan and a step compute the state in a different float order: a value within an ulp of a
# rounding boundary can land on the other code. Measured, rel per page: <= 7e-7 here (fp32: 3e-8), also with
# 512-token windows; int4, whose codes are 16x coarser, up to 1e-4 there.
QUANTIZED_REL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUILTIN_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR).eval()


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    """The YAML task only: indexing lm-eval's ~14k bundled task YAMLs would take 10-20 s."""
    return TaskManager(include_path=str(DATA), include_defaults=False)


@pytest.fixture(scope="module")
def entropy_yaml(tmp_path_factory) -> Path:
    """gsq-entropy with threshold 0.8 (about 2/3 of the states int4 here, 1/10 with the preset's 0.5), as a
    YAML path: the stepped and the one-forward results then differ by far more than float noise."""
    path = tmp_path_factory.mktemp("configs") / "entropy-0.8.yaml"
    path.write_text(yaml.safe_dump({**gsq_hf.GSQConfig.from_preset("gsq-entropy").to_dict(),
                                    "name": "entropy-0.8", "threshold": 0.8}))
    return path


@pytest.fixture(scope="module")
def pages() -> list[str]:
    return [json.loads(line)["page"] for line in (DATA / "wikitext_heads.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def windows(tokenizer, pages) -> list[TokenWindows]:
    """Each page's rolling windows as lm-eval forms them (its own functions), as gsq_hf `TokenWindows`."""
    per_page = []
    for page in pages:
        pairs = map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokenizer.encode(page), prefix_token=tokenizer.bos_token_id, max_seq_len=MAX_LENGTH,
            context_len=1))
        rows = [context + scored for context, scored in pairs]
        assert all(len(row) == MAX_LENGTH + 1 for row in rows), "a page is no multiple of 64 tokens: see the YAML"
        per_page.append(TokenWindows.from_ids(torch.tensor(rows), tokenizer))
    return per_page


def evaluate(task_manager: TaskManager, config: str) -> dict:
    """The task through model ``gsq`` from the repository root (the YAML's data_files path is relative)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return simple_evaluate(model="gsq", model_args=f"{MODEL_ARGS},gsq_config={config}", tasks=[TASK],
                               task_manager=task_manager, batch_size=1, log_samples=True)


def page_loglikelihoods(out: dict) -> list[float]:
    samples = sorted(out["samples"][TASK], key=lambda sample: sample["doc_id"])
    return [sample["filtered_resps"][0] for sample in samples]


@pytest.fixture(scope="module")
def runs(task_manager, entropy_yaml) -> dict[str, tuple[str, dict]]:
    """Per config name: the ``gsq_config`` argument and lm-eval's output with it."""
    configs = {"fp32": "fp32", "int8": "int8", "gsq-gate": "gsq-gate", "entropy-0.8": str(entropy_yaml)}
    return {name: (config, evaluate(task_manager, config)) for name, config in configs.items()}


def test_gsq_is_registered():
    assert get_model("gsq") is gsq_lm_eval.GSQLM
    assert issubclass(gsq_lm_eval.GSQLM, HFLM)


@pytest.mark.parametrize("name, mode, rel", [("fp32", "forward", 1e-6), ("int8", "forward", QUANTIZED_REL),
                                             ("gsq-gate", "forward", QUANTIZED_REL), ("entropy-0.8", "stepped", 1e-6)])
def test_rolling_loglikelihood_equals_decode_faithful(runs, model, windows, name, mode, rel):
    """Per page: lm-eval's rolling log-likelihood = -ΣNLL of gsq-hf eval's decode-faithful run on its windows.

    fp32 stores exact states; the entropy config runs stepped in `GSQLM` (one token per forward, as
    `decode_faithful_perplexity` does); int8 and gsq-gate run lm-eval's multi-token forward (QUANTIZED_REL)."""
    config, out = runs[name]
    assert out["config"]["gsq_mode"] == mode and out["config"]["gsq_config"]["name"] == name
    for loglikelihood, page in zip(page_loglikelihoods(out), windows, strict=True):
        nll = decode_faithful_perplexity(model, page, config, batch_size=1, progress=False).nll_sum
        assert -loglikelihood == pytest.approx(nll, rel=rel)


def test_stepped_batch_with_right_padding_equals_each_row_alone(entropy_yaml):
    """`HFLM` right-pads a batch; stepping feeds the padding after a row's tokens, so it changes none of their
    logits. Up to float order: a batch of two computes in another order than one row, which can flip a
    quantized code (measured: 1e-4 on logits of magnitude 20; the same holds for lm-eval's own forward)."""
    lm = gsq_lm_eval.GSQLM(pretrained=str(BUILTIN_MODEL_DIR), gsq_config=str(entropy_yaml), device="cpu")
    assert lm.gsq_mode == "stepped"
    rows = torch.randint(2, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    rows[1, 16:] = lm.tokenizer.pad_token_id
    batch = lm._model_call(rows)
    torch.testing.assert_close(batch[0], lm._model_call(rows[:1])[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(batch[1, :16], lm._model_call(rows[1:, :16])[0], rtol=0, atol=1e-3)


def test_entropy_config_differs_from_one_forward(runs, model, windows):
    """The entropy config in one teacher-forced forward per window (what lm-eval's own ``hf`` model runs on the
    patched model): no next-token signal inside a forward, so every state is stored high, unlike stepping."""
    config, out = runs["entropy-0.8"]
    with gsq_hf.patched(model, config):
        forward = [-F.cross_entropy(model(input_ids=page.ids).logits[:, :-1].flatten(0, 1), page.ids[:, 1:].flatten(),
                                    reduction="sum").item() for page in windows]
    for one_forward, stepped in zip(forward, page_loglikelihoods(out), strict=True):
        assert abs(one_forward / stepped - 1) > 1e-4


def test_perplexities_are_lm_evals_sums_by_hand(runs, pages):
    """word/byte perplexity and bits per byte are lm-eval's weighted sums over pages, counted by its rule."""
    words = [len(re.split(r"\s+", page)) for page in pages]
    assert words == [84, 188, 46]  # the pages start with " = " and end with "\n": one empty word at each end
    assert [len(page.encode("utf-8")) for page in pages] == [388, 950, 237]  # 杜甫: 3 bytes a character
    for _, out in runs.values():
        nll = -sum(page_loglikelihoods(out))
        results = out["results"][TASK]
        assert results["word_perplexity,none"] == pytest.approx(math.exp(nll / sum(words)), rel=1e-12)
        assert results["byte_perplexity,none"] == pytest.approx(math.exp(nll / 1575), rel=1e-12)
        assert results["bits_per_byte,none"] == pytest.approx(nll / (1575 * math.log(2)), rel=1e-12)


@pytest.mark.parametrize("text, words", [
    (" = Du Fu = \n \n Du Fu was a poet . \n", 12),  # the empty pieces before " =" and after "\n" count
    ("Du Fu was a poet .", 6),
    (" Du Fu", 3),
    ("Du\t\tFu \n", 3),
])
def test_window_words_are_counted_as_lm_eval_counts_them(tokenizer, text, words):
    windows = TokenWindows.from_ids(torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text)]]), tokenizer)
    assert windows.words.tolist() == [words] == [ConfigurableTask.count_words(text)]
    assert windows.bytes.tolist() == [ConfigurableTask.count_bytes(text)]


def test_cli_runs_the_yaml_task(runs, tmp_path, monkeypatch):
    """``gsq-hf lm-eval`` is lm-eval's CLI with ``gsq`` registered; the YAML task run as a user runs it."""
    monkeypatch.chdir(REPO)
    # lm-eval's CLI always indexes its bundled tasks too (10-20 s); this task needs none of them
    monkeypatch.setattr(TaskManager, "__init__", partialmethod(TaskManager.__init__, include_defaults=False))
    model_args = f"pretrained={BUILTIN_MODEL_DIR},max_length={MAX_LENGTH},gsq_config=int8"  # the CLI sets device
    from gsq_hf.cli import main

    code = main(["lm-eval", "run", "--model", "gsq", "--model_args", model_args, "--device", "cpu",
                 "--include_path", str(DATA), "--tasks", TASK, "--batch_size", "1", "--output_path", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.rglob("results_*.json")
    results = json.loads(path.read_text())
    assert results["config"]["gsq_mode"] == "forward" and results["config"]["gsq_config"]["name"] == "int8"
    assert results["results"][TASK] == runs["int8"][1]["results"][TASK]


def test_cli_without_lm_eval_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gsq_lm_eval, "HAS_LM_EVAL", False)
    assert gsq_lm_eval.cli_main(["--tasks", TASK]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'gsq_hf[lmeval]'" in err


def test_cli_failure_inside_lm_eval_is_one_line(monkeypatch, capsys):
    """A failure inside lm-eval (here: the Hub dataset of a task, offline) is one line and exit 1 unless --debug,
    which gsq-hf takes out of the arguments lm-eval parses."""
    import lm_eval.__main__

    seen = []

    def unreachable():
        seen.append(list(sys.argv))
        raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub (LocalEntryNotFound)\n"
                              "more lines")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", unreachable)
    assert gsq_lm_eval.cli_main(["run", "--tasks", "wikitext"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gsq-hf lm-eval: error: ConnectionError: Couldn't reach" in err and "--debug" in err
    with pytest.raises(ConnectionError):
        gsq_lm_eval.cli_main(["run", "--debug", "--tasks", "wikitext"])
    assert seen[-1] == ["lm-eval", "run", "--tasks", "wikitext"]


def test_cli_help_says_how_to_name_the_gsq_model(capsys):
    assert gsq_lm_eval.cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gsq-hf lm-eval: ") and "--model gsq --model_args pretrained=DIR,gsq_config=" in out
    assert "usage: lm-eval" in out  # lm-eval's own help after it
