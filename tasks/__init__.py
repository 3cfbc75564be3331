"""Celery task definitions: thin orchestration of ``worker/`` pieces."""

from worker.celery_app import app

__all__ = ["app"]
