"""``imgsync evaluate``: measure models on the catalog's own labels (images of one SKU should find
each other) with exact search over a seeded sample, side by side; check how much the serving ANN
index loses against exact search. Each result is kept for ``imgsync cutover`` to compare."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from schemas.evaluation import EvaluationOutput
from worker.cli.common import console, emit_json, ensure_schema, err_console, handle_errors, milvus_session, plain, settings_from
from worker.errors import ConfigError
from worker.ledger import ImageState, Ledger, make_engine

__all__ = ["evaluate", "resolve_models", "MAX_SAMPLE"]

#: largest --sample (memory of exact search: ~40 bytes × 256 × sample size per block)
MAX_SAMPLE = 20_000


@handle_errors
def evaluate(
    ctx: typer.Context,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            metavar="SPEC|MODEL_ID",
            help="A model version (model id, spec or unique prefix) or a spec to encode here, e.g. random:64 "
            "(the control). Repeat to compare. Default: every active version.",
        ),
    ] = None,
    sample: Annotated[int, typer.Option(min=4, max=MAX_SAMPLE, help="Images in the sample (SKUs with >= 2 images).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sample and of the bootstrap: equal seeds, equal samples.")] = 0,
    ann: Annotated[bool, typer.Option("--ann/--no-ann", help="Also measure the serving ANN index against exact search.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Same-SKU retrieval (Recall@1 with a 95% interval, Recall@5, mAP, silhouette), encode speed,
    size and memory of each model on a seeded sample of the catalog; exact search, not the index."""
    from worker.encoders.spec import spec_given_by
    from worker.evaluate import draw_sample, save_evaluation
    from worker.evaluate_run import run_evaluation, sample_images
    from worker.index.milvus_store import store_for

    settings = settings_from(ctx)
    ensure_schema(settings)
    ledger = Ledger(make_engine(settings.effective_database_url))
    try:
        sources = resolve_models(ledger, model or [])
        indexed = ledger.select(states=(ImageState.indexed,))
        drawn = draw_sample(sample_images(indexed), sample, seed)
        needs_milvus = ann or any(s.version is not None for s in sources)
        with milvus_session(settings) if needs_milvus else nullcontext(None) as uri:
            store = store_for(settings, uri) if uri else None
            try:
                with _progress(enabled=not json_out) as progress, spec_given_by("--model") if model else nullcontext():
                    doc = run_evaluation(
                        settings, ledger, store, sources, drawn, indexed=indexed, ann=ann, reporter=_Bar(progress)
                    )
            finally:
                if store is not None:
                    store.close()
    finally:
        ledger.engine.dispose()
    try:
        for result in doc.models:
            save_evaluation(settings.home, doc.sample, result)
    except OSError as exc:
        err_console.print(plain(f"warning: results not kept for `imgsync cutover` ({settings.home / 'evaluations'}): {exc}"))
    if json_out:
        emit_json(doc)
    else:
        print_evaluation(doc)


def resolve_models(ledger: Ledger, texts: Sequence[str]):  # type: ignore[no-untyped-def]
    """``--model`` values as versions (model id, spec or unique prefix of a model id), or else as
    specs encoded here; none given: every active version, serving first.

    Raises:
        ConfigError: a value that is neither a known version nor a spec, or nothing to evaluate.
    """
    from worker.cli.versions import id_prefix, resolve_version
    from worker.encoders import BACKENDS, parse_spec
    from worker.evaluate_run import ModelSource
    from worker.ledger import VersionStatus

    if not texts:
        active = ledger.versions((VersionStatus.serving, VersionStatus.standby, VersionStatus.building))
        if not active:
            raise ConfigError("nothing to evaluate: no model version holds images yet (run `imgsync index` first)")
        return [ModelSource(v.spec or v.model_id, v) for v in active]
    out: list[ModelSource] = []
    for text in texts:
        try:
            v = resolve_version(ledger, text)
            source = ModelSource(v.spec or v.model_id, v)
        except ConfigError as not_version:
            every = ledger.versions(tuple(VersionStatus.ACTIVE) + (VersionStatus.retired,))
            if sum(id_prefix(v.model_id, text.strip()) for v in every) > 1:
                raise  # an ambiguous prefix: the message lists the candidates
            try:
                parse_spec(text)
            except ConfigError as not_spec:
                known = "; ".join(f"{v.model_id} ({v.status})" for v in every) or "none yet"
                why = str(not_spec).replace("IMGSYNC_MODEL", "--model")
                raise ConfigError(
                    f"--model {text!r} is neither a model version of the index (known versions: {known}) nor a "
                    f"model spec <backend>:<name>[@<weights>] (backends: {', '.join(BACKENDS)}): {why}"
                ) from not_version
            source = ModelSource(text.strip())
        if source not in out:
            out.append(source)
    return out


def print_evaluation(doc: EvaluationOutput) -> None:
    """The models side by side, one column each."""
    s = doc.sample
    table = Table(
        "", *(Column(header=plain(m.spec + (f" ({m.status})" if m.status else ""))) for m in doc.models),
        title=f"evaluation: {s.images} images, {s.skus} SKUs, {s.queries} queries (seed {s.seed}; exact cosine search)",
    )  # fmt: skip
    rows: list[tuple[str, list[str]]] = [
        ("model id", [m.model_id for m in doc.models]),
        ("Recall@1 [95% CI]", [f"{m.recall_at_1:.3f} [{m.recall_at_1_ci[0]:.3f}, {m.recall_at_1_ci[1]:.3f}]" for m in doc.models]),
        ("Recall@5", [f"{m.recall_at_5:.3f}" for m in doc.models]),
        ("mAP", [f"{m.mean_ap:.3f}" for m in doc.models]),
        ("silhouette (cosine)", [f"{m.silhouette:.3f}" for m in doc.models]),
        ("encode images/s", [_speed(m.images_per_second, m.batch_size, m.device, m.images_timed) for m in doc.models]),
        ("parameters", [f"{m.parameters / 1e6:.2f} M" for m in doc.models]),
        ("weights", [f"{m.weights_bytes / 2**20:.1f} MiB" for m in doc.models]),
        ("peak memory", [_memory(m.peak_memory_bytes, m.peak_memory_method) for m in doc.models]),
        ("vector dim", [str(m.dim) for m in doc.models]),
        ("vectors / 1M images", [f"{m.index_bytes_per_million / 1e9:.2f} GB raw float32" for m in doc.models]),
        ("vectors: index / encoded", [f"{m.vectors_from_index} / {m.vectors_encoded}" for m in doc.models]),
    ]
    for name, cells in rows:
        table.add_row(name, *(plain(c) for c in cells))
    console.print(table)
    if doc.ann is not None:
        a = doc.ann
        console.print(
            plain(
                f"ANN index of {a.collection} ({a.index_type}): recall@{a.k} against exact search = "
                f"{a.recall_at_k:.3f} over {a.queries} queries ({a.vectors_scanned} vectors scanned)"
            )
        )
    for note in doc.notes:
        err_console.print(plain(f"note: {note}"))


def _speed(ips: float | None, batch: int, device: str, timed: int) -> str:
    return f"{ips:.1f} (batch {batch}, {device}, {timed} images)" if ips is not None else "-"


def _memory(nbytes: int | None, method: str) -> str:
    if nbytes is None:
        return "unknown"
    how = "CUDA max allocated" if method == "cuda_max_allocated" else "RSS delta"
    return f"{nbytes / 2**20:.1f} MiB ({how})"


class _Bar:
    """Progress on stderr as a rich bar, one task per step (encoding each model, the ANN check)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def start(self, label: str, total: int) -> None:
        self.task = self.progress.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def _progress(*, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, disable=not enabled,
    )  # fmt: skip
