"""Settings and deploy files (Prometheus, Grafana) of imgsync."""

from config.settings import DEFAULT_MODEL, Settings

__all__ = ["DEFAULT_MODEL", "Settings"]
