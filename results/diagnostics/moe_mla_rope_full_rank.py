"""MoE-MLA-RoPE with the RoPE control's exact model and recipe (table2 on the TinyStories sample), but with a
full-rank latent (kv_compression = 1.0): the diagnosis in EXPERIMENTS.md. A second argument sets another
compression (0.5 retrains the control row itself, for seeds the control did not run).

    python results/diagnostics/moe_mla_rope_full_rank.py SEED [KV_COMPRESSION]
"""

import sys

from moemla.experiments.reproduce import setup
from moemla.experiments.sweep import run_tc
from moemla.train.loop import train

seed = int(sys.argv[1])
compression = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
s = setup("table2", data="data/tinystories-sample", seeds=(seed,), rows=("moe-mla-rope",))
(spec,) = s.specs  # the control row's model and training settings, seed included
cfg = spec.cfg.replace(kv_compression=compression)
train("data/tinystories-sample", f"runs/moe-mla-rope-r{cfg.kv_lora_rank}-s{seed}", cfg, run_tc(spec, s.tc), resume=True)
