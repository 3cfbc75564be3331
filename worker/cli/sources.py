"""``imgsync sources {sqs,webhook,outbox,folder}``: long-running event sources. Each command lives
with its source in ``worker/sources/<name>.py`` (module imports stay light: heavy clients load inside)."""

from __future__ import annotations

import typer

from worker.sources import folder, outbox, sqs, webhook

__all__ = ["sources_app"]

sources_app = typer.Typer(help="Long-running event sources (S3 via SQS, MinIO webhook, catalog outbox, folder).", no_args_is_help=True)
sources_app.command("sqs")(sqs.command)
sources_app.command("webhook")(webhook.command)
sources_app.command("outbox")(outbox.command)
sources_app.command("folder")(folder.command)
