"""The Celery app: JSON only, routes per stage, late acks. Configured at the entry point
(``configure``), never at import time."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from config.settings import Settings
from worker.dispatch import TASK_ENCODE, TASK_PREPROCESS, TASK_PREPROCESS_BATCH, TASK_REFRESH_SKU, Dispatcher
from worker.runtime import Runtime

__all__ = ["app", "configure", "runtime", "dispatcher", "settings"]

log = logging.getLogger(__name__)

app = Celery("imgsync")
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    event_serializer="json",
)

_state: dict[str, object] = {}


def configure(settings: Settings) -> Celery:
    """Point the app at the broker and queues of ``settings`` and remember them for this process."""
    queues = settings.queues
    conf = {
        "broker_url": settings.effective_broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_default_queue": queues.preprocess,
        "task_routes": {
            TASK_PREPROCESS: {"queue": queues.preprocess},
            TASK_PREPROCESS_BATCH: {"queue": queues.preprocess},
            TASK_ENCODE: {"queue": queues.encode},
            TASK_REFRESH_SKU: {"queue": queues.sku},
        },
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        # Redis: a message taken by a worker that died comes back after the visibility timeout, which
        # is longer than the longest retry delay (a delayed retry waits unacknowledged in a worker);
        # the sweep that brings such messages back runs every few seconds, not every 100 s
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout,
            "unacked_restore_interval": max(1, min(10, settings.broker_visibility_timeout // 4)),
            "unacked_restore_throttle": 1,
            # a Redis that accepts connections but never answers held a publish (and a source's
            # stop) for ever: no socket read waits longer than this (workers poll with 1 s BRPOPs)
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT,
        },
        "timezone": "UTC",
    }
    if settings.embedded_broker:
        settings.home.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {}  # worker.embedded_broker: one SQLite file, no options
    if app.conf.broker_url and app.conf.broker_url != conf["broker_url"]:
        _drop_broker_pools()
    app.conf.update(conf)
    from tasks import pipeline as task_module  # registers the tasks on ``app``

    task_module.apply_batching(settings.batching)
    _state["settings"] = settings
    _state.pop("runtime", None)
    return app


#: seconds a Redis broker socket read or connect may wait
BROKER_SOCKET_TIMEOUT = 10.0


def _drop_broker_pools() -> None:
    """Forget connections and producers pooled for a previous broker (a process re-configured)."""
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    # kombu keeps producer pools process-wide, keyed by connection: one whose connection pool was
    # closed above answers "Acquire on closed pool" when the process switches back to that broker
    from kombu import pools

    pools.reset()


def settings() -> Settings:
    """The settings of this process (built from the environment on first use in a bare worker)."""
    if "settings" not in _state:
        configure(Settings())
    return _state["settings"]  # type: ignore[return-value]


def runtime() -> Runtime:
    if "runtime" not in _state:
        _state["runtime"] = Runtime(settings())
    return _state["runtime"]  # type: ignore[return-value]


def dispatcher() -> Dispatcher:
    return Dispatcher(app, settings().queues, settings().preprocess_batch)


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    rt = _state.get("runtime")
    if isinstance(rt, Runtime):
        rt.reset_after_fork()


@worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: object) -> None:
    import os

    from worker.metrics import mark_process_dead

    mark_process_dead(pid or os.getpid())
