"""`gsq_hf.plot` (Agg, no pixels compared: what the axes hold) and ``gsq-hf eval --plot``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from gsq_hf import plot  # noqa: E402
from gsq_hf.cli import main  # noqa: E402


def record(config, policy, bits, ppl, state_bytes=None, **extra):
    return {"config": config, "policy": policy, "avg_state_bits": bits, "perplexity": ppl,
            "state_bytes": state_bytes if state_bytes is not None else int(bits * 100), **extra}


PAYLOAD = {
    "model": "m", "dataset": "d", "split": "test", "context": 64,
    "results": [
        record("fp32", "static", 32.0, 10.0),
        record("int4", "static", 6.0, 12.0),  # out of order on purpose: the line is drawn sorted by bits
        record("int8", "static", 10.0, 10.1),
        record("gsq-gate", "gate", 11.6, 10.05),
        record("gsq-budget", "budget", 8.5, 11.0),
        {"config": "broken", "perplexity": None, "avg_state_bits": None, "error": "NaN/Inf next-token logits"},
    ],
    "reference": {"config": "reference", "perplexity": 9.99},
}


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_pareto_uniform_line_dynamic_points_reference(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(PAYLOAD))
    assert [c.get_label() for c in plot.pareto(tmp_path / "results.json").axes[0].collections] == [
        "gsq-gate", "gsq-budget"]  # the payload's path plots the same
    fig = plot.pareto(PAYLOAD)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    uniform = next(line for line in ax.lines if line.get_label() == "uniform formats")
    assert list(uniform.get_xdata()) == [6.0, 10.0, 32.0]  # sorted by bits, the failed record left out
    assert list(uniform.get_ydata()) == [12.0, 10.1, 10.0]
    assert [c.get_label() for c in ax.collections] == ["gsq-gate", "gsq-budget"]  # one labelled point each
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(11.6, 10.05), (8.5, 11.0)]
    reference = next(line for line in ax.lines if line.get_label().startswith("unpatched reference"))
    assert set(reference.get_ydata()) == {9.99}
    assert set(texts(ax)) == {"fp32", "int4", "int8", "gsq-gate", "gsq-budget"}
    assert "broken" not in texts(ax)
    assert ax.get_xlabel().startswith("average stored bits") and ax.get_ylabel() == "perplexity"
    assert ax.get_yscale() == "linear" and ax.get_xscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["uniform formats", "gsq-gate", "gsq-budget"] and legend[3].startswith("unpatched")


def test_pareto_delta_against_state_bytes_from_a_list():
    fig = plot.pareto(PAYLOAD["results"], x="bytes", y="delta", title="t")
    (ax,) = fig.axes
    uniform = next(line for line in ax.lines if line.get_label() == "uniform formats")
    assert list(uniform.get_xdata()) == [600, 1000, 3200]
    np.testing.assert_allclose(uniform.get_ydata(), [20.0, 1.0, 0.0])  # % vs the first config (fp32)
    assert ax.get_ylabel() == "Δ perplexity vs fp32 (%)" and ax.get_xlabel().startswith("state bytes")
    assert ax.get_title() == "t"
    assert not any(line.get_label().startswith("unpatched") for line in ax.lines)  # no reference in a list


def test_pareto_marks_what_threshold_policies_allocate():
    """Bits moved on x; a config allocating clearly more per element also gets a hollow marker there."""
    results = [record("fp32", "static", 32.0, 10.0, ssm_state_bytes=65536, full_precision_ssm_state_bytes=65536),
               record("gsq-gate", "gate", 11.63, 10.05, ssm_state_bytes=54272, full_precision_ssm_state_bytes=65536),
               record("gsq-tight", "budget", 8.5, 10.2, ssm_state_bytes=17408, full_precision_ssm_state_bytes=65536)]
    (ax,) = plot.pareto(results).axes
    assert "bytes moved per step" in ax.get_xlabel()
    gate = [c for c in ax.collections if c.get_label() in ("gsq-gate", "_allocated")]
    assert [tuple(c.get_offsets()[0]) for c in gate] == [(11.63, 10.05), (26.5, 10.05)]  # 32 x 54272 / 65536
    assert len([c for c in ax.collections if c.get_label() == "_allocated"]) == 1  # 8.5 bits in 8.5: no mark
    assert "hollow: bits allocated per element (memory held)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert max(ax.get_xticks()) >= 26.5  # the hollow marker is inside the ticks
    (ax,) = plot.pareto(results, x="bytes").axes  # the allocation itself on x: nothing to mark
    assert "_allocated" not in [c.get_label() for c in ax.collections] and "allocated" in ax.get_xlabel()


def test_pareto_old_records_and_log_scale():
    """Records without ``policy`` (older JSON) are classified by their format fractions."""
    old = [{k: v for k, v in r.items() if k != "policy"} for r in PAYLOAD["results"][:5]]
    for r in old:
        static = r["config"] in ("fp32", "int4", "int8")
        r["format_fractions"] = ({r["config"]: 1.0, "fp32_fallback": 0.0} if static
                                 else {"int8": 0.7, "fp16": 0.3, "fp32_fallback": 0.0})
    old[1]["perplexity"] = 500.0  # int4 blows up: a log axis keeps the others readable
    (ax,) = plot.pareto(old).axes
    assert len(next(line for line in ax.lines if line.get_label() == "uniform formats").get_xdata()) == 3
    assert len(ax.collections) == 2 and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="x must be"):
        plot.pareto(old, x="tokens")


def trace_dict(layers=3, writes=5, batch=2):
    high = torch.rand(layers, writes, batch, generator=torch.Generator().manual_seed(0))
    return {"high_fraction": high, "unit_formats": None, "layers": [0, 2, 5][:layers], "config": "gsq-gate",
            "policy": "gate", "low_format": "int8", "high_format": "fp16"}


def test_precision_trace_heatmap_and_summary():
    trace = trace_dict()
    fig = plot.precision_trace(trace)
    heat, line, colorbar = fig.axes
    (image,) = heat.images
    np.testing.assert_allclose(image.get_array(), trace["high_fraction"].mean(dim=2).numpy(), rtol=1e-6)
    assert image.get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in heat.get_yticklabels()] == ["0", "2", "5"]  # model layer indices
    assert heat.get_ylabel() == "layer" and heat.get_title() == "gsq-gate — precision trace, mean over 2 rows"
    assert colorbar.get_ylabel() == "fraction in fp16 (else int8)"
    np.testing.assert_allclose(line.lines[0].get_ydata(), trace["high_fraction"].mean(dim=2).mean(dim=0).numpy(),
                               rtol=1e-6)
    assert line.get_xlabel() == "token (state write)"


def test_precision_trace_row_tokens_tensor_input():
    trace = trace_dict(writes=4)
    fig = plot.precision_trace(trace, row=1, tokens=["a", "b\n", "c", "d"], summary=False)
    heat = fig.axes[0]
    assert len(fig.axes) == 2  # heatmap + colorbar
    np.testing.assert_allclose(heat.images[0].get_array(), trace["high_fraction"][:, :, 1].numpy())
    assert [t.get_text() for t in heat.get_xticklabels()] == ["a", "b\\n", "c", "d"]
    assert heat.get_title().endswith("row 1")
    bare = plot.precision_trace(torch.ones(2, 7))  # (layers, tokens)
    assert bare.axes[0].images[0].get_array().shape == (2, 7)
    with pytest.raises(IndexError):
        plot.precision_trace(trace, row=2)


def test_plot_module_imports_matplotlib_lazily():
    code = "import sys, gsq_hf, gsq_hf.plot, gsq_hf.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_plot_writes_pareto_and_traces(tmp_path, capsys):
    out = tmp_path / "plots"
    code = main(["eval", "--max-tokens", "64", "--context", "32", "--config", "int8", "--config", "fp32",
                 "--config", "gsq-gate", "--quiet", "--plot", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "trace-gsq-gate.png"]  # static: no trace
    for png in out.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = plot.pareto(json.loads((tmp_path / "r.json").read_text())).axes  # what pareto.png shows
    assert len(ax.lines[0].get_xdata()) == 2
    assert [c.get_label() for c in ax.collections][:2] == ["gsq-gate", "_allocated"]  # gate allocates more


def test_pareto_one_label_for_formats_of_equal_bits():
    records = [record("fp32", "static", 32.0, 10.0), record("bf16", "static", 16.0, 10.02),
               record("fp16", "static", 16.0, 10.0)]
    (ax,) = plot.pareto(records).axes
    assert sorted(texts(ax)) == ["bf16 / fp16", "fp32"]
    assert len(ax.lines[0].get_xdata()) == 3


def positions(*ppl):
    return {"starts": [0, 256, 1024][: len(ppl)], "ends": [256, 1024, 2048][: len(ppl)], "perplexity": list(ppl)}


def test_by_position_one_line_per_config_relative_to_the_first():
    records = [record("fp32", "static", 32.0, 10.0, position_buckets=positions(10.0, 8.0, 5.0)),
               record("int8", "static", 10.0, 10.0, position_buckets=positions(10.0, 8.04, 5.01)),
               record("gsq-gate", "gate", 11.6, 10.0, position_buckets=positions(10.08, 8.0, 5.0)),
               {"config": "broken", "perplexity": None, "error": "NaN/Inf next-token logits"}]
    (ax,) = plot.by_position(records).axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["fp32 (Δ = 0)", "int8", "gsq-gate"]  # the baseline as y = 0, the failed one left out
    assert list(lines["int8"].get_ydata()) == pytest.approx([0.0, 0.5, 0.2])  # % vs fp32, bucket by bucket
    assert list(lines["gsq-gate"].get_ydata()) == pytest.approx([0.8, 0.0, 0.0])
    assert lines["int8"].get_linestyle() == "-" and lines["gsq-gate"].get_linestyle() == "--"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1–255", "256–1023", "1024–2047"]
    assert ax.get_yscale() == "linear"  # |Δ| <= 1%: symmetric-log only beyond 100 x linear_pct
    assert not ax.containers  # no standard errors given: no error bars
    records[1]["position_buckets"]["delta_stderr"] = [0.001, 0.002, 0.003]
    (ax,) = plot.by_position(records).axes
    (bars,) = ax.containers
    ends = [y for segment in bars.lines[2][0].get_segments() for y in segment[:, 1]]
    assert ends == pytest.approx([-0.1, 0.1, 0.3, 0.7, -0.1, 0.5])  # Δ ± 100 x stderr, in %
    records[1]["position_buckets"] = positions(10.0, 8.0, 6.0)  # +20%
    assert plot.by_position(records).axes[0].get_yscale() == "symlog"
    with pytest.raises(ValueError, match="baseline"):
        plot.by_position(records[3:] + records[:3])


def test_by_position_kl_draws_each_config_kl_on_a_log_axis():
    records = [record("fp32", "static", 32.0, 10.0, position_buckets=positions(10.0, 8.0)),
               record("int8", "static", 10.0, 10.0, position_buckets={**positions(10.0, 8.0),
                                                                   "kl_divergence": [1e-5, 2e-5]}),
               record("int4", "static", 6.0, 10.0, position_buckets={**positions(10.0, 8.0),
                                                                  "kl_divergence": [1e-3, 3e-3],
                                                                  "kl_stderr": [1e-4, 2e-4]}),
               record("gsq-gate", "gate", 11.6, 10.0, position_buckets=positions(10.0, 8.0))]  # no KL: left out
    (ax,) = plot.by_position(records, metric="kl").axes
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert list(lines) == ["int8", "int4"]
    assert list(lines["int4"].get_ydata()) == [1e-3, 3e-3] and ax.get_yscale() == "log"
    (bars,) = ax.containers  # int4's standard errors, in nats
    assert [y for seg in bars.lines[2][0].get_segments() for y in seg[:, 1]] == pytest.approx([9e-4, 1.1e-3,
                                                                                                2.8e-3, 3.2e-3])
    with pytest.raises(ValueError, match="metric must be 'delta' or 'kl'"):
        plot.by_position(records, metric="nll")


def test_families_draws_one_line_per_family_with_uniform_solid():
    records = [
        {"family": "uniform", "config": "fp32", "avg_state_bits": 32.0, "loss": 0.0},
        {"family": "uniform", "config": "int4", "avg_state_bits": 4.5, "loss": 0.4},
        {"family": "uniform", "config": "int8", "avg_state_bits": 8.5, "loss": 0.0},
        {"family": "gate-closed int3/int8", "config": "g@0.3", "avg_state_bits": 8.2, "loss": 0.0},
        {"family": "gate-closed int3/int8", "config": "g@0.02", "avg_state_bits": 4.8, "loss": 0.9},
        {"family": "entropy int3/int8", "config": "e@0.25", "avg_state_bits": 7.7, "loss": float("nan")},
        {"family": "broken", "config": "x", "avg_state_bits": 4.0, "loss": 1.0, "error": "boom"},
    ]
    fig = plot.families(records, y="loss", y_label="recall loss (points)", baseline="fp32", title="t")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"fp32 (0)", "uniform", "gate-closed int3/int8"}  # NaN and failed records left out
    assert list(lines["uniform"].get_xdata()) == [4.5, 8.5, 32.0] and lines["uniform"].get_linestyle() == "-"
    assert list(lines["gate-closed int3/int8"].get_xdata()) == [4.8, 8.2]
    assert lines["gate-closed int3/int8"].get_linestyle() == "--"
    assert {"fp32", "int4", "int8", "0.3", "0.02"} <= set(texts(ax))
    assert ax.get_ylabel() == "recall loss (points)" and ax.get_title() == "t"
    assert ax.get_yscale() == "linear"
    assert plot.families(records, y="loss", symlog=0.01).axes[0].get_yscale() == "symlog"  # |0.9| > 10 x 0.01


def test_families_gives_configs_at_the_same_bits_one_label_ordered_as_their_points():
    records = [{"family": "uniform", "config": "int4", "avg_state_bits": 6.0, "kl": 1e-2},
               *({"family": "composed", "config": c, "avg_state_bits": 4.5, "kl": kl}
                 for c, kl in (("low", 1e-3), ("high", 9e-3), ("mid", 4e-3))),
               {"family": "composed", "config": "three", "avg_state_bits": 3.5, "kl": 5e-3}]
    ax = plot.families(records, y="kl").axes[0]
    assert {"high\nmid\nlow", "three"} <= set(texts(ax))  # top to bottom, as their points


def test_a_figure_displays_in_ipython_without_matplotlib_inline(monkeypatch):
    """A notebook shows the returned Figure as a PNG even when no ``%matplotlib inline`` registered Figure's
    formatter (a pyplot-free Figure has none until then)."""
    interactiveshell = pytest.importorskip("IPython.core.interactiveshell")
    from matplotlib.figure import Figure

    shell = interactiveshell.InteractiveShell.instance()
    monkeypatch.setattr("IPython.get_ipython", lambda: shell)
    png = shell.display_formatter.formatters["image/png"]
    png.pop(Figure, None)  # as a fresh kernel has it
    figure = plot.pareto([{"config": "fp32", "perplexity": 10.0, "avg_state_bits": 32.0, "policy": "static"},
                          {"config": "int8", "perplexity": 10.1, "avg_state_bits": 10.0, "policy": "static"}])
    data, _ = shell.display_formatter.format(figure)
    assert data["image/png"].startswith(b"\x89PNG")


def test_nothing_to_plot_is_said():
    """An empty or all-failed result list, or a metric no record has: a ValueError, not an empty figure."""
    with pytest.raises(ValueError, match="nothing to plot: no record has a finite perplexity"):
        plot.pareto([{"config": "int8", "error": "NaN/Inf", "perplexity": None, "avg_state_bits": 10.0}])
    with pytest.raises(ValueError, match="no record has a finite 'avg_state_bits' and 'nope' .*keys: avg_state_bits"):
        plot.families([{"family": "uniform", "config": "int8", "avg_state_bits": 10.0, "recall": 0.9}], y="nope")
