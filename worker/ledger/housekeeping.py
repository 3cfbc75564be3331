"""Ledger housekeeping: worker heartbeats and dead letters (messages that can never be processed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.ledger.tables import dead_letters, workers

__all__ = ["HousekeepingMixin"]


def _now() -> datetime:
    return datetime.now(UTC)


class HousekeepingMixin:
    """Methods of :class:`~worker.ledger.Ledger` that are not about images or SKUs."""

    engine: Engine
    _reader: Engine  # read-only transactions (worker.ledger.db.reader)

    # --- dead letters ----------------------------------------------------------------------------

    #: longest message body kept with a dead letter
    DEAD_LETTER_BODY_MAX = 10_000

    def dead_letter(self, task: str, body: str, reason: str, error: str) -> None:
        """Keep a message that cannot be processed, with why (it is not retried)."""
        with self.engine.begin() as conn:
            conn.execute(
                dead_letters.insert().values(
                    task=task, reason=reason, error=error[:2000], body=body[: self.DEAD_LETTER_BODY_MAX], created_at=_now()
                )
            )

    def dead_letter_count(self) -> int:
        with self._reader.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar_one())

    def dead_letter_rows(self, limit: int = 100, *, task: str | None = None, since: datetime | None = None) -> list[dict]:
        """Dead letters, newest first, optionally of one ``task`` and newer than ``since``."""
        q = sa.select(dead_letters).order_by(dead_letters.c.id.desc()).limit(limit)
        if task is not None:
            q = q.where(dead_letters.c.task == task)
        if since is not None:
            q = q.where(dead_letters.c.created_at >= since)
        with self._reader.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters by task (a pipeline task or a source, e.g. ``sources.sqs``)."""
        q = sa.select(dead_letters.c.task, sa.func.count()).group_by(dead_letters.c.task)
        with self._reader.connect() as conn:
            return {task: int(n) for task, n in conn.execute(q)}

    # --- worker heartbeats ---------------------------------------------------------------------

    def heartbeat(self, name: str, *, host: str, pid: int, queues: str, model: str) -> None:
        """Record that worker node ``name`` is alive now."""
        now = _now()
        with self.engine.begin() as conn:
            res = conn.execute(workers.update().where(workers.c.name == name).values(last_seen=now))
            if res.rowcount == 0:
                conn.execute(
                    workers.insert().values(
                        name=name, host=host, pid=pid, queues=queues, model=model, started_at=now, last_seen=now
                    )
                )

    def forget_worker(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(workers.delete().where(workers.c.name == name))

    def live_workers(self, max_age_seconds: float) -> list[dict]:
        """Worker nodes seen within ``max_age_seconds``; older rows are dropped."""
        cutoff = _now() - timedelta(seconds=max_age_seconds)
        with self.engine.begin() as conn:
            conn.execute(workers.delete().where(workers.c.last_seen < cutoff))
            rows = conn.execute(sa.select(workers).order_by(workers.c.name)).mappings().all()
        return [dict(r) for r in rows]
