"""How fast one encode worker empties a full encode queue when its model costs (almost) nothing: the
work a GPU worker does per image besides the forward pass, which caps its images/s whatever the GPU.

    python benchmarks/bench_drain.py [--images 3000] [--batch-max 32,256] [--broker URL --database URL]
                                     [--device-ms 0.2 --overlap off,auto]

The embedded stack (or the given broker and database, with a Milvus Lite server) runs with
``random:512`` (vectors from a digest of 32 × 32 pixels: no network, 512 dimensions like ViT-B-32),
preprocessing in the CPU worker. Its encode worker is ended after a warm-up, the catalog is published
and preprocessed until every image waits in the encode queue, then a fresh encode worker is started
and timed from its first message until the ledger holds every image as indexed. That worker does what
a GPU worker does per image: receive and acknowledge the message (celery-batches), read the pixels,
ask the ledger for the current versions, upsert the vectors into Milvus, mark the rows indexed, and
publish the batch's SKU refresh.

Reported per image: the encode worker's CPU milliseconds (its process, from /proc) and the Milvus Lite
server's, and the drain rate. ``1000 / encode worker ms`` is the most one encode process can do on a
GPU box of the same per-core speed, before its forward passes.

``--device-ms X`` gives the timed worker a SIMULATED GPU (``benchmarks/simdevice``; no real device):
each batch's forward pass is queued on a device thread that is busy ``X`` ms per image without
holding the GIL, as a CUDA stream is. The model bound is then ``1000 / X`` images/s, and the run
reports the device's utilisation (busy time ÷ drain time) for each ``--overlap`` mode
(``IMGSYNC_ENCODE_OVERLAP``): how much of the worker's own work write-behind hides behind the
forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu import write_photos  # noqa: E402
from benchmarks.bench_handoff import hand_over, warm_then_end_encoder  # noqa: E402
from benchmarks.bench_scale import cpu_by_role  # noqa: E402

#: small photos: the preprocessing before the drain is not what is measured
SIZES = [(320, 240), (240, 320)]


SIMDEVICE = Path(__file__).resolve().parent / "simdevice"


def drain(
    root: Path,
    home: Path,
    batch_max: int,
    broker: str | None,
    database: str | None,
    profile: Path | None = None,
    device_ms: float = 0.0,
    overlap: str = "auto",
) -> dict:
    """Fill the encode queue with every image under ``root``, then time a fresh encode worker
    emptying it."""
    from config.settings import Settings
    from worker.cli.indexing import collect_events
    from worker.cli.stack import EmbeddedStack
    from worker.ledger import Ledger, make_engine, upgrade
    from worker.status import queue_depths

    extra = {k: v for k, v in (("broker_url", broker), ("database_url", database)) if v}
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, home=home, model="random:512", device="cpu", metrics_port=0, redrive_interval_seconds=0,
        batch_max=batch_max, **extra,
    )  # fmt: skip
    upgrade(settings.effective_database_url)
    if database:  # a database of the caller's, maybe used before: start from an empty ledger
        _reset(database)
    ledger = Ledger(make_engine(settings.effective_database_url))
    stack = EmbeddedStack(settings, stop_timeout=10)
    stack.start()
    q = settings.queues
    try:
        warm = warm_then_end_encoder(stack, home / "warm", 8, SIZES)
        events = collect_events([str(root)], None)
        hand_over(stack, events)
        goal = len(events) + len(warm)
        full = queue_depths(settings)[q.encode] or 0  # messages: one per image, or per batch of images
        busy_file = home / "sim-device-busy"
        stack.env = {**stack.env, "IMGSYNC_ENCODE_OVERLAP": overlap}
        if device_ms:
            root_dir = str(SIMDEVICE.parents[1])
            stack.env.update(
                IMGSYNC_BENCH_SIM_DEVICE_MS=str(device_ms),
                IMGSYNC_BENCH_SIM_DEVICE_BUSY=str(busy_file),
                PYTHONPATH=os.pathsep.join([str(SIMDEVICE), root_dir, stack.env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            )
        stack.workers[1] = stack.spawn("encode", q.encode, None)
        while (queue_depths(settings)[q.encode] or 0) >= full:  # until it takes its first messages
            time.sleep(0.005)
        before, started = cpu_by_role(stack), time.perf_counter()
        spy = _py_spy(stack.workers[1].pid, profile / f"encode-worker-batch{batch_max}.txt") if profile else None
        while ledger.counts()["indexed"] < goal:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        after = cpu_by_role(stack)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        stack.stop()
    n = len(events)
    sim = {}
    if device_ms:
        busy = float(busy_file.read_text()) if busy_file.exists() else 0.0
        sim = {
            "simulated_device_ms_per_image": device_ms,
            "model_bound_images_per_s": round(1000 / device_ms, 1),
            "device_utilisation": round(busy / elapsed, 3),
        }
    return {
        "images": n,
        "encode_messages": full,
        "batch_max": batch_max,
        "overlap": overlap,
        **sim,
        "drain_images_per_s": round(n / elapsed, 1),
        "encode_worker_cpu_ms_per_image": round(1000 * (after["encode_worker"] - before["encode_worker"]) / n, 3),
        "milvus_lite_cpu_ms_per_image": round(1000 * (after["milvus_lite"] - before["milvus_lite"]) / n, 3),
        "cpu_worker_cpu_ms_per_image": round(1000 * (after["cpu_worker"] - before["cpu_worker"]) / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--batch-max", default="32,256", help="IMGSYNC_BATCH_MAX values, comma-separated (one drain each)")
    ap.add_argument("--broker", help="IMGSYNC_BROKER_URL (default: the embedded SQLite broker)")
    ap.add_argument("--database", help="IMGSYNC_DATABASE_URL (default: the embedded SQLite ledger)")
    ap.add_argument("--rounds", type=int, default=1, help="drains per batch size, alternating")
    ap.add_argument("--profile", type=Path, help="write py-spy samples of the encode worker here (collapsed stacks)")
    ap.add_argument("--device-ms", type=float, default=0.0, help="a SIMULATED device's ms per image (0: none)")
    ap.add_argument("--overlap", default="auto", help="IMGSYNC_ENCODE_OVERLAP values, comma-separated (one drain each)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgsync-drain-"))
    write_photos(work / "catalog", args.images, SIZES)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    runs = []
    for r in range(args.rounds):
        for b in (int(x) for x in args.batch_max.split(",")):
            for mode in args.overlap.split(","):
                home = work / f"home-{b}-{mode}-{r}"
                runs.append(
                    drain(work / "catalog", home, b, args.broker, args.database, args.profile, args.device_ms, mode)
                )
    out = {"date": f"{datetime.now(UTC):%Y-%m-%d}", "commit": commit, "cpus": os.cpu_count(), "runs": runs}
    print(json.dumps(out, indent=1))


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (``pip install py-spy``) sampling ``pid`` until SIGINT, collapsed stacks to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    # --idle --threads: waits are samples too, per thread (the writers wait on Milvus and the ledger)
    cmd = [exe, "record", "-p", str(pid), "-r", "200", "--format", "raw", "-o", str(out), "--nonblocking", "--idle", "--threads"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reset(database: str) -> None:
    import sqlalchemy as sa

    from worker.ledger.tables import metadata

    engine = sa.create_engine(database)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


if __name__ == "__main__":
    main()
