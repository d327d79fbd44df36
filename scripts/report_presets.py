"""The memory report of a small random Mamba and Mamba2 after `generate`, for every preset.

    python scripts/report_presets.py --json results/preset_memory.json

Shapes: hidden 256, 4 layers, d_state 16 (Mamba: 512 channels; Mamba2: 8 heads × 64, one group);
batch 4, a 32-token prompt and 32 new tokens, greedy. The byte counts depend only on shapes and on the
policy's decisions (which depend on the random weights for gate/entropy policies).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import gsq_hf
from gsq_hf.cli.common import run_script

MODELS = {
    "mamba": lambda: MambaForCausalLM(MambaConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4,
                                                  state_size=16)),
    "mamba2": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=1024, hidden_size=256, num_hidden_layers=4,
                                                     state_size=16, head_dim=64, num_heads=8, n_groups=1)),
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'model':7s} {'preset':12s} {'state B':>9s} {'full B':>9s} {'ratio':>6s} {'bits':>6s} "
          f"{'B/step':>9s}  format fractions")
    for family, build in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        ids = torch.randint(2, 1024, (4, 32), generator=torch.Generator().manual_seed(0))
        for preset in gsq_hf.list_presets():
            with gsq_hf.patched(model, preset):
                out = model.generate(ids, max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
            report = out.cache.memory_report()
            report.pop("layers")
            rows.append({"model": family, "preset": preset, **report})
            fractions = ", ".join(f"{k} {v:.2f}" for k, v in report["format_fractions"].items() if v)
            print(f"{family:7s} {preset:12s} {report['state_bytes']:9d} {report['full_precision_state_bytes']:9d} "
                  f"{report['state_bytes'] / report['full_precision_state_bytes']:6.3f} "
                  f"{report['avg_state_bits']:6.2f} {report['state_bytes_per_step']:9d}  {fractions}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    run_script(main)
