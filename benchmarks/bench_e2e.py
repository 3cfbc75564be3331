"""End to end vs the naive loop vs the model's own limit, measured in one run on one machine.

    python benchmarks/bench_e2e.py [--images 120] [--naive-images 40] [--model open_clip:ViT-B-32]

1. model bound: bare batched forward of the encoder on already-preprocessed pixels (batch = BATCH_MAX);
2. naive baseline: the tutorial loop — for each file PIL open + convert, the model's transform, encode
   one image, insert one row into Milvus;
3. imgsync end to end: the embedded stack (Milvus Lite server, CPU worker, encode worker with
   micro-batching), from enqueue to the last image recorded as indexed;
4. preprocessing alone on every core (imgsync's decode + crop + resize, one process per core), and the
   co-located ceiling 1 / (1/model bound + 1/preprocessing): what any pipeline can reach when the same
   cores must both decode and run the model (without a GPU the two compete for the CPUs).
Prints one JSON document with images/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(1280, 960), (2048, 1536), (3000, 2000), (4000, 3000), (1600, 1600), (2400, 1800)]


def write_photos(root: Path, n: int, n_skus: int = 20) -> list[Path]:
    """JPEG product photos of 1–12 MP (structure + sensor noise), laid out <sku>/<n>.jpg."""
    from tests.helpers import photo

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        base = np.asarray(photo(w // 8, h // 8, seed=i).resize((w, h), Image.Resampling.BILINEAR), np.int16)
        noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        path = root / f"SKU-{i % n_skus:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
        files.append(path)
    return files


def model_bound(spec: str, n: int, batch: int) -> float:
    from worker.encoders import create_encoder

    enc = create_encoder(spec).load()
    h, w = enc.preprocess_cfg.size
    pixels = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(batch)]
    enc.encode(pixels)
    done, started = 0, time.perf_counter()
    while done < n:
        enc.encode(pixels)
        done += batch
    return done / (time.perf_counter() - started)


_PROCESS_STATE: dict = {}  # per pool process: its Runtime and model, made by the warm-up call


def _preprocess_files(args: tuple[str, list[str]]) -> int:
    from config.settings import EncoderConfig, Settings
    from worker import pipeline
    from worker.encoders import create_encoder
    from worker.runtime import Runtime

    spec, paths = args
    if _PROCESS_STATE.get("spec") != spec:  # load once: model loading is not preprocessing
        home = Path(tempfile.mkdtemp())
        _PROCESS_STATE.update(
            spec=spec,
            rt=Runtime(Settings(_env_file=None, home=home, model=spec, device="cpu")),  # type: ignore[call-arg]
            enc=create_encoder(EncoderConfig(spec=spec, device="cpu", precision="fp32")).load(),
        )
    rt, enc = _PROCESS_STATE["rt"], _PROCESS_STATE["enc"]
    for p in paths:
        pipeline.model_pixels(rt, Path(p).read_bytes(), None, enc)
    return len(paths)


def _warm(spec: str, path: str, barrier) -> None:  # type: ignore[no-untyped-def]
    _preprocess_files((spec, [path]))
    barrier.wait()  # every process has its model before any timed work starts


def preprocess_all_cores(spec: str, files: list[Path]) -> float:
    """imgsync's preprocessing of ``files`` split over one process per core, images/s. Each process
    loads its model in a warm-up call first, with a barrier so that every process gets one."""
    import multiprocessing as mp
    import os

    cores = os.cpu_count() or 1
    parts = [[str(f) for f in files[i::cores]] for i in range(cores)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(cores + 1)
    with ctx.Pool(cores, initializer=_warm, initargs=(spec, str(files[0]), barrier)) as pool:
        barrier.wait()
        started = time.perf_counter()
        done = sum(pool.map(_preprocess_files, [(spec, p) for p in parts]))
        return done / (time.perf_counter() - started)


def naive(spec: str, files: list[Path], milvus_uri: str, device: str = "cpu") -> float:
    import open_clip
    import torch
    from pymilvus import DataType, MilvusClient

    name = spec.split(":", 1)[1].split("@")[0]
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    model.eval()
    client = MilvusClient(uri=milvus_uri)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    dim = model.visual.output_dim
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection("naive_bench", schema=schema, index_params=index)
    started = time.perf_counter()
    for i, f in enumerate(files):
        img = Image.open(f).convert("RGB")
        with torch.no_grad():
            v = model.encode_image(transform(img).unsqueeze(0).to(device))[0].float().cpu()
        v = (v / v.norm()).tolist()
        client.insert("naive_bench", [{"id": i, "vector": v}])
    rate = len(files) / (time.perf_counter() - started)
    client.drop_collection("naive_bench")
    client.close()
    return rate


def imgsync_e2e(
    spec: str, root: Path, home: Path, batch: int, threads: int = 0, *, during=None, **extra: object
) -> tuple[float, int]:
    """imgsync end to end over every image under ``root``: (images/s, images indexed). ``extra``:
    more Settings; ``during``: a context manager entered around the timed part (e.g. a GPU sampler)."""
    import contextlib

    from config.settings import Settings
    from worker.cli.indexing import collect_events, publish, wait_for
    from worker.cli.stack import EmbeddedStack
    from worker.ledger import upgrade

    values: dict[str, object] = {
        "home": home, "model": spec, "batch_max": batch, "batch_wait_ms": 200, "worker_concurrency": 1,
        "metrics_port": 0, "torch_threads": threads,
    }  # fmt: skip
    values.update(extra)
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    upgrade(settings.effective_database_url)
    stack = EmbeddedStack(settings)
    stack.start()
    try:
        warm_dir = home.parent / "warm"
        write_photos(warm_dir, max(2, 2 * settings.worker_concurrency))  # every CPU child loads its model
        events = collect_events([str(warm_dir)], None)
        wait_for(settings, events, publish(settings, events), timeout=600, show_progress=False)  # models loaded
        events = collect_events([str(root)], None)
        with during if during is not None else contextlib.nullcontext():
            started = time.perf_counter()
            results = wait_for(settings, events, publish(settings, events), timeout=3600, show_progress=False)
            elapsed = time.perf_counter() - started
        indexed = sum(r.outcome == "indexed" for r in results)
        return indexed / elapsed, indexed
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--naive-images", type=int, default=40)
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--threads", default="0",
        help="comma-separated IMGSYNC_TORCH_THREADS of the encode worker to compare (0: torch's default)",
    )  # fmt: skip
    args = ap.parse_args()

    from worker.index import LiteServer

    work = Path(tempfile.mkdtemp(prefix="imgsync-bench-"))
    files = write_photos(work / "catalog", args.images)
    by_threads = {}
    for t in [int(x) for x in args.threads.split(",")]:
        by_threads[t] = imgsync_e2e(args.model, work / "catalog", work / f"home-{t}", args.batch, t)
    e2e_rate, indexed = by_threads[int(args.threads.split(",")[0])]
    bound = model_bound(args.model, args.images, args.batch)
    pre_rate = preprocess_all_cores(args.model, files)
    ceiling = 1.0 / (1.0 / bound + 1.0 / pre_rate)
    with LiteServer(work / "naive-milvus") as server:
        naive_rate = naive(args.model, files[: args.naive_images], server.uri)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "date": f"{datetime.now(UTC):%Y-%m-%d}", "commit": commit, "model": args.model, "batch": args.batch,
        "images": args.images, "indexed": indexed, "naive_images": args.naive_images,
        "model_bound_images_per_s": round(bound, 2), "naive_images_per_s": round(naive_rate, 2),
        "imgsync_images_per_s": round(e2e_rate, 2),
        "e2e_over_model_bound": round(e2e_rate / bound, 2), "e2e_over_naive": round(e2e_rate / naive_rate, 2),
        "imgsync_images_per_s_by_torch_threads": {t: round(r, 2) for t, (r, _) in by_threads.items()},
        "preprocess_all_cores_images_per_s": round(pre_rate, 2), "colocated_ceiling_images_per_s": round(ceiling, 2),
        "e2e_over_colocated_ceiling": round(e2e_rate / ceiling, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
