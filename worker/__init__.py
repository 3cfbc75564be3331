"""imgsync runtime: sources, fetchers, image ops, encoders, Milvus store, ledger, CLI."""

__version__ = "0.1.0"
