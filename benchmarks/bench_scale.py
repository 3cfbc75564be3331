"""Scale and re-index: does the cost grow linearly from 1k to 10k images, and does re-indexing
unchanged content cost no forward pass?

    python benchmarks/bench_scale.py [--small 1000] [--large 10000] [--model tiny]

For each size, a fresh embedded stack (SQLite broker and ledger, Milvus Lite server, the CPU worker
and the encode worker of `imgsync up`) indexes N photos (320×240 JPEGs over N/10 SKUs), timed from
enqueue to the last image recorded; then the same images are submitted again (what `imgsync reindex`
and a replayed event stream do) and timed until every one is reported `unchanged`. Forward passes
are read from the encode worker's batch-size histogram (its `_sum` is the images encoded); CPU
per image of each stack process (and of the publishing/polling CLI side) from /proc.

The default model is `tiny` on purpose: it makes the pipeline's own per-image costs (broker, ledger,
Milvus, SKU refresh) dominate, which is what grows with the catalog; a big model only adds a
constant cost per image. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_photos(root: Path, n: int) -> None:
    from tests.helpers import photo

    for i in range(n):
        path = root / f"SKU-{i // 10:05d}" / f"{i % 10}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(320, 240, seed=i).save(path, quality=85)


def metric_sum(metrics_dir: Path, name: str, **labels: str) -> float:
    """The samples ``name`` with ``labels``, summed over the stack's processes (its metrics dir)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return sum(
        s.value
        for f in registry.collect()
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def stage_images(metrics_dir: Path, stage: str, outcome: str) -> float:
    """``imgsync_images_total{stage, outcome}``: e.g. the images preprocess has handed to encode
    (``preprocess``, ``queued``), however many share a message."""
    return metric_sum(metrics_dir, "imgsync_images_total", stage=stage, outcome=outcome)


def encoded_images(metrics_dir: Path) -> float:
    return metric_sum(metrics_dir, "imgsync_encode_batch_size_sum")


def _tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(child for child, ppid in parent.items() if ppid == pid)
    return total


def cpu_by_role(stack) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """CPU seconds so far of each part of the embedded stack, and of this process (publisher and
    ``--wait`` poller)."""
    roles = {"cpu_worker": stack.workers[0].pid, "encode_worker": stack.workers[1].pid}
    if stack.server is not None and stack.server.proc is not None:
        roles["milvus_lite"] = stack.server.proc.pid
    out = {name: _tree_cpu_seconds(pid) for name, pid in roles.items()}
    me = os.times()
    out["publisher_and_poller"] = me.user + me.system
    return out


def run(model: str, root: Path, home: Path) -> dict:
    from config.settings import Settings
    from worker.cli.indexing import collect_events, publish, wait_for
    from worker.cli.stack import EmbeddedStack
    from worker.ledger import upgrade

    settings = Settings(_env_file=None, home=home, model=model, metrics_port=0)  # type: ignore[call-arg]
    upgrade(settings.effective_database_url)
    stack = EmbeddedStack(settings)
    stack.start()
    try:
        warm = root.parent / f"warm-{root.name}"
        write_photos(warm, 2)
        events = collect_events([str(warm)], None)
        wait_for(settings, events, publish(settings, events), timeout=600, show_progress=False)  # models loaded
        out: dict = {}
        for phase in ("first", "unchanged"):
            events = collect_events([str(root)], None)
            before = encoded_images(stack.metrics_dir)
            cpu_before = cpu_by_role(stack)
            started = time.perf_counter()
            results = wait_for(settings, events, publish(settings, events), timeout=7200, show_progress=False)
            elapsed = time.perf_counter() - started
            outcomes: dict[str, int] = {}
            for r in results:
                outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
            cpu_after = cpu_by_role(stack)
            time.sleep(1.0)  # let the last batch's samples reach the files
            out[phase] = {
                "cpu_ms_per_image": {
                    k: round(1000 * (cpu_after[k] - cpu_before.get(k, 0.0)) / len(events), 3) for k in cpu_after
                },
                "seconds": round(elapsed, 2),
                "images_per_s": round(len(events) / elapsed, 1),
                "outcomes": outcomes,
                "forward_passes": int(encoded_images(stack.metrics_dir) - before),
            }
        from benchmarks.bench_gpu import stage_summary

        out["stages"] = stage_summary(stack.metrics_dir)  # both phases and the warm-up
        return out
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=10000)
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    if args.small >= args.large:
        ap.error("--small must be below --large (each size runs on a stack of its own)")
    work = Path(tempfile.mkdtemp(prefix="imgsync-scale-"))
    results = {}
    for n in (args.small, args.large):
        root = work / f"catalog-{n}"
        write_photos(root, n)
        results[n] = run(args.model, root, work / f"home-{n}")
        print(json.dumps({n: results[n]}), file=sys.stderr, flush=True)
    small, large = results[args.small], results[args.large]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "date": f"{datetime.now(UTC):%Y-%m-%d}", "commit": commit, "model": args.model, "cpus": os.cpu_count(),
        "results": results,
        "large_over_small_time": round(large["first"]["seconds"] / small["first"]["seconds"], 2),
        "size_ratio": args.large / args.small,
        "first_over_unchanged_small": round(small["first"]["seconds"] / small["unchanged"]["seconds"], 2),
        "first_over_unchanged_large": round(large["first"]["seconds"] / large["unchanged"]["seconds"], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
