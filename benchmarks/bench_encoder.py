"""Model-bound throughput: a bare batched forward of an encoder on already-preprocessed pixels.

    python benchmarks/bench_encoder.py [--model open_clip:ViT-B-32] [--batches 1,8,32,64] [--seconds 8]

Prints one JSON line per batch size (images/s) and a markdown table for BENCHMARKS.md. Random weights
are fine: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import UTC, datetime

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="time budget per batch size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    import torch

    from config.settings import EncoderConfig
    from worker.encoders import create_encoder

    enc = create_encoder(EncoderConfig(spec=args.model, device=args.device, precision=args.precision)).load()
    h, w = enc.preprocess_cfg.size
    rng = np.random.default_rng(0)
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(bs)]
        enc.encode(pixels)  # warm-up
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds or n == 0:
            enc.encode(pixels)
            n += bs
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - started)
        row = {"model": args.model, "device": str(enc.device), "precision": args.precision, "batch": bs, "images_per_s": round(rate, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{datetime.now(UTC):%Y-%m-%d}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, commit {commit}\n")
    print("| model | device | batch | images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['batch']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
