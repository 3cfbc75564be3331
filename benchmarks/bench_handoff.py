"""The preprocess stage's CPU work per image, with and without the JPEG handoff
(``IMGSYNC_JPEG_DECODE=preprocess`` vs ``encoder``), in one run on the same files.

    python benchmarks/bench_handoff.py [--images 60] [--small-images 120] [--model open_clip:ViT-B-32]

For each image, both modes do what the preprocess task does besides its ledger and broker calls:
content hash, then either decode + trim + model geometry + pixel-store write (``preprocess``) or a
header check + pixel-store write of the JPEG's bytes (``encoder``), on imgsync's own functions, one
process. The encode side's read of the entry is timed too. Reported as images/s per CPU core, so a
GPU box's cores can be sized from it: a GPU worker fed by N cores gets at most N × that rate.

Also prints the cosine between the vectors of the two paths (the device path run here on the CPU,
where ``torchvision.io.decode_jpeg`` uses libjpeg-turbo; nvJPEG on a GPU is checked by
``bench_gpu.py`` and tests/unit/encoders/test_cuda.py).

Then the real pipeline's feed rate: the embedded stack with its encode worker ended after warm-up, the
time from publishing the catalog until every image waits in the encode queue, in both modes. This is
what the CPU side of a GPU box can feed a GPU with (per-image Celery, ledger, broker and pixel-store
work included), measured without any GPU. With it, the CPU worker node's CPU milliseconds per image
(prefork parent and children, from /proc): on a shared 2-core machine the feed rate also counts the
publisher's share of the cores, the CPU per image does not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_e2e import SIZES  # noqa: E402
from benchmarks.bench_gpu import SMALL_SIZES, write_photos  # noqa: E402


def _rate(fn: Callable[[bytes], object], blobs: list[bytes], rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        started = time.process_time()  # CPU time of this process: the machine may be shared
        for blob in blobs:
            fn(blob)
        best = max(best, len(blobs) / (time.process_time() - started))
    return best


def measure(spec: str, blobs: list[bytes], rounds: int) -> dict:
    from config.settings import Settings
    from worker import pipeline
    from worker.imaging.device_decode import decode_batch
    from worker.runtime import Runtime

    home = Path(tempfile.mkdtemp(prefix="imgsync-handoff-"))
    cpu_rt = Runtime(Settings(_env_file=None, home=home / "a", model=spec, device="cpu"))  # type: ignore[call-arg]
    dev_rt = Runtime(Settings(_env_file=None, home=home / "b", model=spec, device="cpu", jpeg_decode="encoder"))  # type: ignore[call-arg]
    enc = cpu_rt.encoder
    dev_rt.__dict__["encoder"] = enc
    handed = [pipeline.jpeg_handoff(dev_rt, b, enc) for b in blobs]
    if any(h is None for h in handed):
        raise SystemExit("some benchmark photos were not handed over")

    def decode_here(blob: bytes) -> str:
        pipeline.content_hash(blob)
        return cpu_rt.pixels.put(pipeline.model_pixels(cpu_rt, blob, None, enc))

    def hand_over(blob: bytes) -> str:
        pipeline.content_hash(blob)
        return dev_rt.pixels.put(pipeline.jpeg_handoff(dev_rt, blob, enc))  # type: ignore[arg-type]

    out = {
        "preprocess_decodes_per_core": round(_rate(decode_here, blobs, rounds), 1),
        "preprocess_hands_over_per_core": round(_rate(hand_over, blobs, rounds), 1),
    }
    out["ratio"] = round(out["preprocess_hands_over_per_core"] / out["preprocess_decodes_per_core"], 2)
    keys = [hand_over(b) for b in blobs]
    started = time.process_time()
    for k in keys:
        dev_rt.pixels.get(k)
    out["encode_side_entry_reads_per_core"] = round(len(keys) / (time.process_time() - started), 1)
    out["mean_bytes_per_entry"] = {
        "pixels": int(np.prod(enc.preprocess_cfg.size) * 3),
        "jpeg": int(np.mean([len(b) for b in blobs])),
    }
    sample = handed[:16]
    device = decode_batch([(h, None) for h in sample], enc.preprocess_cfg, enc.device, auto_trim=True, max_chunk_pixels=2**28)  # type: ignore[misc]
    a = enc.encode(device)  # type: ignore[arg-type]
    b = enc.encode([pipeline.model_pixels(cpu_rt, blob, None, enc) for blob in blobs[:16]])
    cos = (a * b).sum(axis=1)
    out["cos_device_path_to_cpu_path_min"] = round(float(cos.min()), 6)
    return out


def feed_rate(
    spec: str, root: Path, home: Path, jpeg_decode: str, concurrency: int, preprocess_batch: int = 16
) -> tuple[float, float]:
    """Images/s from publishing every image under ``root`` until all wait in the encode queue, and
    the CPU worker node's CPU milliseconds per image meanwhile (prefork parent and children, /proc):
    what sizes the cores a GPU box needs, whatever else shares this machine's cores."""
    from benchmarks.bench_scale import _tree_cpu_seconds
    from config.settings import Settings
    from worker.cli.indexing import collect_events
    from worker.cli.stack import EmbeddedStack
    from worker.ledger import upgrade

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=home, model=spec, device="cpu", worker_concurrency=concurrency, metrics_port=0,
        jpeg_decode=jpeg_decode, redrive_interval_seconds=0, preprocess_batch=preprocess_batch,
    )  # fmt: skip
    upgrade(settings.effective_database_url)
    stack = EmbeddedStack(settings, stop_timeout=5)
    stack.start()
    try:
        warm_then_end_encoder(stack, home / "warm", 2 * concurrency, [(640, 480)])  # every CPU child loads its model
        events = collect_events([str(root)], None)
        node = stack.workers[0].pid
        cpu = _tree_cpu_seconds(node)
        started = time.perf_counter()
        hand_over(stack, events)
        elapsed = time.perf_counter() - started
        return len(events) / elapsed, 1000 * (_tree_cpu_seconds(node) - cpu) / len(events)
    finally:
        stack.stop()


def warm_then_end_encoder(stack, folder: Path, n: int, sizes: list[tuple[int, int]]) -> list:  # type: ignore[no-untyped-def]
    """Index ``n`` photos through the whole running stack (every worker loads its model), then end
    its encode worker, so that what is handed to encode next waits in the queue. The warm events."""
    from worker.cli.indexing import collect_events, publish, wait_for

    write_photos(folder, n, sizes)
    warm = collect_events([str(folder)], None)
    wait_for(stack.settings, warm, publish(stack.settings, warm), timeout=600, show_progress=False)
    encode = stack.workers[1]  # ended, not SIGSTOPped: a stopped process may hold the SQLite lock
    encode.send_signal(signal.SIGTERM)
    encode.wait(120)
    return warm


def hand_over(stack, events: list) -> None:  # type: ignore[no-untyped-def]
    """Publish ``events`` and wait until preprocess has handed every one to encode: counted from the
    stack's metrics, since the queue's depth counts messages and a message may carry several."""
    from benchmarks.bench_scale import stage_images
    from worker.cli.indexing import publish

    queued = stage_images(stack.metrics_dir, "preprocess", "queued") + len(events)
    publish(stack.settings, events)
    while stage_images(stack.metrics_dir, "preprocess", "queued") < queued:
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=60, help="1–12 MP photos")
    ap.add_argument("--small-images", type=int, default=120, help="0.5–1 MP catalog photos")
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 1, help="CPU worker processes of the feed runs")
    ap.add_argument("--skip-feed", action="store_true", help="leave out the pipeline feed runs")
    ap.add_argument(
        "--preprocess-batches", default="16", help="IMGSYNC_PREPROCESS_BATCH values of the feed runs, comma-separated (A/B)"
    )  # fmt: skip
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgsync-handoff-photos-"))
    big = [p.read_bytes() for p in write_photos(work / "big", args.images, SIZES)]
    small = [p.read_bytes() for p in write_photos(work / "small", args.small_images, SMALL_SIZES)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {
        "date": f"{datetime.now(UTC):%Y-%m-%d}", "commit": commit, "model": args.model, "cpus": os.cpu_count(),
        "photos_1_12_mp": measure(args.model, big, args.rounds),
        "catalog_0_5_1_mp": measure(args.model, small, args.rounds),
    }  # fmt: skip
    if not args.skip_feed:
        batches = [int(b) for b in args.preprocess_batches.split(",")]
        for name, folder in (("photos_1_12_mp", "big"), ("catalog_0_5_1_mp", "small")):
            for b in batches:
                for mode in ("preprocess", "encoder"):  # alternate: both see the same machine load
                    home = work / f"home-{folder}-{mode}-{b}"
                    rate, cpu_ms = feed_rate(args.model, work / folder, home, mode, args.concurrency, b)
                    result[name][f"pipeline_feed_images_per_s_{mode}_batch{b}"] = round(rate, 1)
                    result[name][f"pipeline_feed_cpu_node_ms_per_image_{mode}_batch{b}"] = round(cpu_ms, 2)
                r = result[name]
                r[f"pipeline_feed_ratio_batch{b}"] = round(
                    r[f"pipeline_feed_images_per_s_encoder_batch{b}"] / r[f"pipeline_feed_images_per_s_preprocess_batch{b}"], 2
                )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
