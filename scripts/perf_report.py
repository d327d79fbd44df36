"""Markdown tables from the JSON of ``bench_state_update.py`` and ``bench_generate.py`` (for docs/performance.md).

    python scripts/perf_report.py docs/perf/bench_state_update_h200.json docs/perf/bench_generate_h200.json

State update: one row per (shape, batch, method), plain and CUDA-graph µs side by side, the graph row's
fraction of the measured copy bandwidth and speed-up over the fused fp32 kernel; the conv rows (``--conv``) also
as a list of speed-ups over today's torch conv + kernel. Generate: tokens/s per config and its ratio to the
unpatched model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def state_update_tables(result: dict) -> str:
    rows = {}
    for row in result["rows"]:
        if row["us"] is None:
            continue
        rows.setdefault((row["shape"], row["batch"], row["method"]), {})[row["mode"]] = row
    lines = [f"Device: {result['device']}, copy bandwidth {result['copy_bandwidth_GBps'] / 1e3:.2f} TB/s "
             f"(read + write); activations {result['act_dtype']}; versions {result['versions']}.", ""]
    for shape in dict.fromkeys(key[0] for key in rows):
        lines += [f"**{shape}**", "",
                  "| batch | method | µs plain | µs graph | MB moved | % of copy bandwidth (graph) "
                  "| × fused fp32 (graph) |",
                  "|---|---|---|---|---|---|---|"]
        for (s, batch, method), modes in sorted(rows.items(), key=lambda kv: kv[0][1]):  # stable: run order
            if s != shape:
                continue
            plain, graph = modes.get("plain"), modes.get("graph")
            any_row = plain or graph
            lines.append(f"| {batch} | {method} | {_fmt(plain and plain['us'], '.1f')} | "
                         f"{_fmt(graph and graph['us'], '.1f')} | {any_row['bytes'] / 1e6:.2f} | "
                         f"{_fmt(graph and 100 * graph['fraction_of_copy_bandwidth'], '.0f')} | "
                         f"{_fmt(graph and graph['speedup_vs_kernel_fp32'], '.2f')} |")
        lines.append("")
    conv = [row for row in result["rows"] if row.get("x_torch_conv") and row["method"].startswith(
        ("conv-kernel+kernel-", "conv-fused-"))]
    if conv:
        lines += ["Conv + state update, × the torch conv + kernel (same mode):", ""]
        lines += [f"- {r['shape']} batch {r['batch']} {r['method']} ({r['mode']}): {r['us']:.1f} µs, "
                  f"{r['x_torch_conv']:.2f}×" for r in conv]
        lines.append("")
    checks = result.get("fp32_baseline_check", [])
    if checks:
        lines += ["Fused fp32 kernel / mamba_ssm fp32 (same mode; recorded H200 figures when mamba_ssm is absent):",
                  ""]
        lines += [f"- {c['shape']} batch {c['batch']} ({c['mode']}, vs {c['against']}): {c['ratio']:.2f}"
                  for c in checks]
        lines.append("")
    return "\n".join(lines)


def generate_table(result: dict) -> str:
    mode = "decode step in a CUDA graph (generate_graph)" if result.get("graph") else "model.generate"
    lines = [f"Device: {result['device']}, {mode}, model dtype {result['dtype']}, prompt {result['prompt']} tokens, "
             f"{result['new_tokens']} new tokens, median of {result['rounds']} rounds.", "",
             "| shape | batch | config | tokens/s | × unpatched | peak GiB | state MB / sequence |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "tokens_per_s" not in row:
            lines.append(f"| {row['shape']} | {row['batch']} | {row['config']} | error: {row.get('error')} | | | |")
            continue
        state = row["state_bytes_per_sequence"]
        lines.append(f"| {row['shape']} | {row['batch']} | {row['config']} | {row['tokens_per_s']:.0f} | "
                     f"{row['ratio_to_unpatched']:.2f} | {_fmt(row['peak_gib'], '.2f')} | "
                     f"{_fmt(state and state / 1e6, '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by the bench scripts")
    args = parser.parse_args(argv)
    for path in args.results:
        result = json.loads(path.read_text())
        kind = result.get("benchmark")
        if kind == "state_update":
            print(state_update_tables(result))
        elif kind == "generate":
            print(generate_table(result))
        else:
            raise SystemExit(f"{path}: not a bench_state_update / bench_generate result (benchmark={kind!r})")


if __name__ == "__main__":
    from gsq_hf.cli.common import run_script  # here: the tables need nothing of gsq_hf

    run_script(main)
