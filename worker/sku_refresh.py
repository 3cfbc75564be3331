"""The SKU stage: a SKU's vector is the L2-normalized mean of its current image vectors,
recomputed for many SKUs at once and repeated while they change under it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from schemas.reasons import Reason
from worker.encoders.base import l2_normalize
from worker.errors import TransientError
from worker.ledger import VersionRow
from worker.metrics import metrics
from worker.runtime import Runtime

__all__ = ["refresh_skus", "SKU_REFRESH_ROUNDS"]

log = logging.getLogger(__name__)

#: Rounds a SKU refresh repeats while its SKU keeps changing under it.
SKU_REFRESH_ROUNDS = 5


def refresh_skus(rt: Runtime, sku_ids: Sequence[str]) -> dict[str, str]:
    """Recompute SKU vectors as the normalized mean of their current image vectors (fetched by primary
    key), for many SKUs at once: one membership query, one vector fetch and one upsert per version for
    all of them. Repeats for the SKUs that changed under it, so the last write reads the newest
    membership. Returns ``sku -> clean|written|deleted``."""
    with metrics().stage_seconds.labels("sku_refresh").time():
        results = _refresh_skus(rt, sorted(set(sku_ids)))
    for result in results.values():
        metrics().images.labels("sku", result).inc()
    return results


def _refresh_skus(rt: Runtime, sku_ids: list[str]) -> dict[str, str]:
    results = dict.fromkeys(sku_ids, "clean")
    gens = rt.ledger.sku_generations(sku_ids)
    todo = [s for s in sku_ids if gens[s][0] > gens[s][1]]  # the others are clean already
    for _ in range(SKU_REFRESH_ROUNDS):
        if not todo:
            return results
        versions = rt.active_versions()
        counts: dict[str, dict[str, int]] = {}
        for version in versions:  # every active version keeps its SKU vectors true
            outcome, counts[version.model_id] = _refresh_skus_in(rt, version, todo)
            results.update(outcome)
        serving = versions[0]
        todo = rt.ledger.finish_skus(
            [(s, gens[s][0], counts[serving.model_id][s]) for s in todo], serving.model_id
        )
        if todo:
            gens.update(rt.ledger.sku_generations(todo))
    raise TransientError(
        Reason.index_unavailable, f"sku(s) {', '.join(todo[:5])} kept changing during {SKU_REFRESH_ROUNDS} refreshes"
    )


def _refresh_skus_in(rt: Runtime, version: VersionRow, sku_ids: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Write (or delete) one version's vectors of ``sku_ids``; returns what happened and image counts."""
    names = rt.names_for(version)
    members = rt.ledger.sku_members_many(sku_ids, version.model_id)
    wanted = [i for ids in members.values() for i in ids]
    vectors = rt.store.image_vectors(names.images, wanted) if wanted else {}
    outcome: dict[str, str] = {}
    counts: dict[str, int] = {}
    rows: list[tuple[str, np.ndarray, int]] = []
    for sku in sku_ids:
        held = [vectors[i] for i in members[sku] if i in vectors]  # members are sorted by image id
        if len(held) < len(members[sku]):
            log.warning(
                "sku %s: %d of %d member vectors missing in %s",
                sku, len(members[sku]) - len(held), len(members[sku]), names.images,
            )  # fmt: skip
        counts[sku] = len(held)
        outcome[sku] = "written" if held else "deleted"
        if held:
            rows.append((sku, l2_normalize(np.mean(np.stack(held), axis=0)), len(held)))
    if rows:
        rt.store.upsert_skus(names, rows)
    rt.store.delete_skus(names, [s for s in sku_ids if outcome[s] == "deleted"])
    return outcome, counts
