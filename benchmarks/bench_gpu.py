"""Throughput on a CUDA GPU, in one run: model bound, the encode stage, CPU decoding on every core,
batched GPU JPEG decoding, the naive loop and imgsync end to end, with GPU utilisation and memory.

    python benchmarks/bench_gpu.py --out DIR [--images 2000] [--small-images 3000] [--batch 256]

1. model bound: bare forward of the model (fp16 autocast, channels-last) on tensors already on the
   GPU, batch 1 … 512 (CUDA events), with peak GPU memory per batch size;
2. encode stage: ``Encoder.encode`` from host uint8 pixels (pinned copy, normalisation, forward,
   vectors back to the host), the encode worker's own call;
3. CPU preprocessing: imgsync's decode + trim + resize on every core (one process per core), on
   1–12 MP camera JPEGs and on 0.5–1 MP catalog JPEGs;
4. GPU decoding: imgsync's device decode (``IMGSYNC_JPEG_DECODE=encoder``: batched
   ``torchvision.io.decode_jpeg(device="cuda")``, orientation, auto-trim, the model's geometry on the
   GPU), alone and followed by the model; cosine of its vectors to the CPU path's;
5. naive loop on the GPU: PIL open + convert, the model's transform, encode one image, insert one row;
6. imgsync end to end (embedded stack: SQLite broker and ledger, Milvus Lite, one prefork CPU worker
   with a process per spare core, one encode worker on the GPU), GPU utilisation sampled by NVML;
   a run named with ``_nvjpeg`` sets ``IMGSYNC_JPEG_DECODE=encoder`` (preprocess hands JPEG bytes
   over, the encode worker decodes each batch with nvJPEG).

Writes ``DIR/gpu_bench.json`` after every section (a later failure keeps what was measured) and
prints a table at the end. Runs on a CPU too (``--smoke``, for checking the script, not for figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_e2e import SIZES, imgsync_e2e, naive, preprocess_all_cores  # noqa: E402

#: catalog-sized JPEGs (~0.3–1 MP), what a shop's CDN usually serves
SMALL_SIZES = [(800, 800), (1000, 750), (640, 853), (1200, 900), (900, 1200)]  # 0.5–1.1 MP


def _one_photo(args: tuple[Path, int, tuple[int, int], int]) -> str:
    from tests.helpers import photo

    root, i, (w, h), n_skus = args
    rng = np.random.default_rng(i)
    base = photo(max(8, w // 8), max(8, h // 8), seed=i).resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    px = np.clip(np.asarray(base, np.int16) + noise, 0, 255).astype(np.uint8)
    path = root / f"SKU-{i % n_skus:04d}" / f"{i:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, quality=90)
    return str(path)


def write_photos(root: Path, n: int, sizes: list[tuple[int, int]], n_skus: int = 200) -> list[Path]:
    """``n`` JPEG photos (structure + sensor noise) under ``root/<sku>/``, made on every core."""
    jobs = [(root, i, sizes[i % len(sizes)], n_skus) for i in range(n)]
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        return [Path(p) for p in pool.map(_one_photo, jobs, chunksize=8)]


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    f = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)
    return sum(f) - idle, sum(f)


class GpuSampler:
    """GPU utilisation (NVML, %) and memory used, sampled every ``interval`` s while entered, and the
    machine's CPU utilisation over the whole time."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.util: list[int] = []
        self.mem_used: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        self._cpu0 = _cpu_times()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: no samples
            return self

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.util.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                self.mem_used.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = (b - a for a, b in zip(self._cpu0, _cpu_times(), strict=True))
        self.cpu_busy_pct = round(100.0 * busy / total, 1) if total else None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float | int | None]:
        cpu = {"cpu_busy_pct": getattr(self, "cpu_busy_pct", None)}
        if not self.util:
            return {"gpu_util_mean_pct": None, "gpu_util_median_pct": None, "gpu_mem_used_max_mib": None, **cpu}
        return {
            **cpu,
            "gpu_util_mean_pct": round(float(np.mean(self.util)), 1),
            "gpu_util_median_pct": float(np.median(self.util)),
            "gpu_mem_used_max_mib": round(max(self.mem_used) / 2**20),
            "samples": len(self.util),
        }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(fn: Callable[[], int], seconds: float) -> float:
    """Images/s of ``fn`` (returns images done per call) over at least ``seconds``, after a warm-up."""
    fn()
    _sync()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        done += fn()
    _sync()
    return done / (time.perf_counter() - started)


def model_bound(spec: str, precision: str, batches: list[int], seconds: float) -> list[dict]:
    """Bare forward on device tensors and the encode worker's ``Encoder.encode``, per batch size."""
    import torch

    from config.settings import EncoderConfig
    from worker.encoders import create_encoder

    enc = create_encoder(EncoderConfig(spec=spec, device="auto", precision=precision)).load()
    cuda = enc.device.type == "cuda"
    h, w = enc.preprocess_cfg.size
    rows = []
    for bs in batches:
        x = torch.randn(bs, 3, h, w, device=enc.device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def bare(x=x, bs=bs) -> int:
            with torch.inference_mode(), enc._autocast():
                enc._forward_images(x)
            return bs

        bound = _rate(bare, seconds)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        pixels = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(bs)]
        stage = _rate(lambda px=pixels: len(enc.encode(px)), seconds)
        rows.append({
            "batch": bs, "model_bound_images_per_s": round(bound, 1), "encode_stage_images_per_s": round(stage, 1),
            "peak_gpu_mib": round(peak / 2**20) if peak is not None else None,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def gpu_decode(spec: str, precision: str, files: list[Path], batch: int) -> dict:
    """imgsync's device decode (``worker.imaging.device_decode.decode_batch``: batched nvJPEG, EXIF
    orientation, auto-trim, the model's geometry on the GPU), alone and followed by the model; cos of
    its vectors to the CPU path's."""
    import torch

    from config.settings import EncoderConfig, ImagingConfig, Settings
    from worker import pipeline
    from worker.encoders import create_encoder
    from worker.imaging.device_decode import decode_batch, plan_handoff
    from worker.runtime import Runtime

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to check this code (--smoke)
    enc = create_encoder(EncoderConfig(spec=spec, device=dev, precision=precision)).load()
    limits = ImagingConfig(max_pixels=200_000_000, min_side=8)
    handoffs = [plan_handoff(p.read_bytes(), limits, enc.preprocess_cfg, max_bytes=2**26) for p in files]
    if any(h is None for h in handoffs):
        raise SystemExit("a benchmark photo was not handed over")

    def pixels_of(chunk: list) -> list:
        out = decode_batch([(h, None) for h in chunk], enc.preprocess_cfg, enc.device, auto_trim=True, max_chunk_pixels=2**28)
        bad = [o for o in out if isinstance(o, Exception)]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(out)} refused: {bad[0]}")
        return out

    def decode_only() -> int:
        for i in range(0, len(handoffs), batch):
            pixels_of(handoffs[i : i + batch])
        return len(handoffs)

    def decode_and_encode() -> int:
        for i in range(0, len(handoffs), batch):
            enc.encode(pixels_of(handoffs[i : i + batch]))
        return len(handoffs)

    out = {"images": len(handoffs), "batch": batch}
    out["gpu_decode_images_per_s"] = round(_rate(decode_only, 2.0), 1)
    out["gpu_decode_and_model_images_per_s"] = round(_rate(decode_and_encode, 2.0), 1)
    # the same vectors as the CPU path? (fp32 model, 32 images)
    ref = create_encoder(EncoderConfig(spec=spec, device=dev, precision="fp32")).load()
    rt = Runtime(Settings(_env_file=None, home=Path(tempfile.mkdtemp()), model=spec))  # type: ignore[call-arg]
    sample = files[:32]
    cpu_vec = ref.encode([pipeline.model_pixels(rt, p.read_bytes(), None, ref) for p in sample])
    gpu_vec = ref.encode(pixels_of(handoffs[: len(sample)]))
    cos = (cpu_vec * gpu_vec).sum(axis=1)
    out["cos_to_cpu_path_min"] = round(float(cos.min()), 6)
    out["cos_to_cpu_path_mean"] = round(float(cos.mean()), 6)
    return out


def stage_summary(metrics_dir: Path) -> dict:
    """Per pipeline stage: calls and mean ms (``imgsync_stage_seconds``), and the mean encode batch,
    from the stack's Prometheus samples (warm-up included)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    sums: dict[tuple[str, str], float] = {}
    for fam in registry.collect():
        for smp in fam.samples:
            if smp.name.endswith(("_sum", "_count")):
                key = smp.labels.get("stage") or ("batch" if "batch_size" in smp.name else None)
                if key and smp.name.startswith(("imgsync_stage_seconds", "imgsync_encode_batch_size")):
                    kind = "sum" if smp.name.endswith("_sum") else "count"
                    sums[(key, kind)] = sums.get((key, kind), 0.0) + smp.value
    out = {}
    for stage in sorted({k for k, _ in sums}):
        n, total = sums.get((stage, "count"), 0.0), sums.get((stage, "sum"), 0.0)
        if stage == "batch":
            out["encode_batch_mean"] = round(total / n, 1) if n else None
            out["encode_batches"] = int(n)
        else:
            out[f"{stage}_ms"] = round(1000 * total / n, 2) if n else None
            out[f"{stage}_calls"] = int(n)
    return out


def env_info() -> dict:
    import torch

    info = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z", "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        )
    return info


@contextlib.contextmanager
def section(results: dict, name: str, out: Path) -> Iterator[dict]:
    """Run one section; record its figures, or its error, and save everything so far."""
    slot: dict = {}
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        yield slot
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        slot["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    slot["section_seconds"] = round(time.perf_counter() - started, 1)
    results[name] = slot
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({name: slot}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--images", type=int, default=2000, help="1–12 MP photos")
    ap.add_argument("--small-images", type=int, default=3000, help="0.5–1 MP catalog photos")
    ap.add_argument("--naive-images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256, help="IMGSYNC_BATCH_MAX of the end-to-end runs")
    ap.add_argument("--batches", default="1,8,32,64,128,256,512")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per model-bound measurement")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument(
        "--runs", default="e2e_big,e2e_small,e2e_big_nvjpeg,e2e_small_nvjpeg",
        help="end-to-end runs: e2e_<big|small>[_redis][_nvjpeg][_serial][_c<CPU worker processes>], comma-separated "
        "(_serial: IMGSYNC_ENCODE_OVERLAP=off, the encode worker without write-behind)",
    )  # fmt: skip
    ap.add_argument(
        "--redis-server", default="", help="a redis-server binary: also run end to end on a Redis broker (+ pixel store)"
    )  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.small_images, args.naive_images = 24, 24, 4
        args.batches, args.seconds, args.batch = "1,8", 0.2, 8
        args.skip = args.skip or "e2e_big,e2e_small,preprocess"
    skip = set(args.skip.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imgsync-gpu-bench-"))
    results: dict = {"env": env_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    import torch

    cuda = torch.cuda.is_available()
    spare = max(1, (os.cpu_count() or 2) - 2)  # cores left for the CPU worker (encode worker + Milvus)

    big = small = []
    with section(results, "photos", args.out) as r:
        big = write_photos(work / "big", args.images, SIZES)
        small = write_photos(work / "small", args.small_images, SMALL_SIZES)
        r.update(big=len(big), small=len(small), big_mb=round(sum(p.stat().st_size for p in big) / 2**20))
    if "bound" not in skip:
        with section(results, "model_bound", args.out) as r:
            r["rows"] = model_bound(args.model, args.precision, [int(b) for b in args.batches.split(",")], args.seconds)
    if "preprocess" not in skip:
        with section(results, "cpu_preprocess", args.out) as r:
            r["big_images_per_s"] = round(preprocess_all_cores(args.model, big[: min(len(big), 800)]), 1)
            r["small_images_per_s"] = round(preprocess_all_cores(args.model, small[: min(len(small), 1600)]), 1)
    if (cuda or args.smoke) and "gpu_decode" not in skip:
        with section(results, "gpu_decode_big", args.out) as r:
            r.update(gpu_decode(args.model, args.precision, big[:256], 32))
        with section(results, "gpu_decode_small", args.out) as r:
            r.update(gpu_decode(args.model, args.precision, small[:1024], 128))
    if "naive" not in skip:
        from worker.index import LiteServer

        with section(results, "naive", args.out) as r, LiteServer(work / "naive-milvus") as server:
            r["images_per_s"] = round(naive(args.model, big[: args.naive_images], server.uri, "cuda" if cuda else "cpu"), 2)
    runs = []
    redis = None
    for i, name in enumerate(args.runs.split(",")):  # e2e_<big|small>[_redis][_nvjpeg][_serial][_c<CPU workers>]
        parts = name.split("_")
        extra: dict[str, object] = {"worker_concurrency": spare}
        for part in parts[2:]:
            if part == "nvjpeg":
                extra["jpeg_decode"] = "encoder"
            elif part == "serial":
                extra["encode_overlap"] = "off"
            elif part == "redis":
                if not args.redis_server:
                    raise SystemExit(f"{name}: needs --redis-server")
                extra["broker_url"] = f"redis://127.0.0.1:6399/{i}"
            elif part.startswith("c") and part[1:].isdigit():
                extra["worker_concurrency"] = int(part[1:])
            else:
                raise SystemExit(f"{name}: unknown part {part!r} (redis, nvjpeg, serial, c<N>)")
        runs.append((name, work / parts[1], extra))
    if args.redis_server:
        redis = subprocess.Popen(
            [args.redis_server, "--port", "6399", "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1)
    for name, root, extra in runs:
        if name in skip:
            continue
        with section(results, name, args.out) as r:
            sampler = GpuSampler()
            rate, indexed = imgsync_e2e(
                args.model, root, work / f"home-{name}", args.batch, during=sampler,
                precision=args.precision, batch_wait_ms=100, **extra,
            )  # fmt: skip
            r.update(
                images_per_s=round(rate, 1), indexed=indexed, cpu_workers=extra["worker_concurrency"], **sampler.summary()
            )
            r["stages"] = stage_summary(work / f"home-{name}" / "metrics" / "stack")
            logs = work / f"home-{name}" / "logs"
            for f in logs.glob("worker-*.log"):
                (args.out / "logs").mkdir(exist_ok=True)
                (args.out / "logs" / f"{name}-{f.name}").write_bytes(f.read_bytes()[-100_000:])
    if redis is not None:
        redis.terminate()
    print("\n| section | figure |\n|---|---|")
    for name, slot in results.items():
        if name in ("env", "args"):
            continue
        for k, v in slot.items():
            if k != "rows":
                print(f"| {name} | {k}: {v} |")
        for row in slot.get("rows", []):
            print(f"| {name} | {row} |")
    print(json.dumps(results["env"]))


if __name__ == "__main__":
    main()
