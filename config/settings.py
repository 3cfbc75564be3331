"""The one source of configuration: environment variables ``IMGSYNC_*`` and a ``.env`` file.

Precedence (highest first): explicit keyword arguments (tests, the CLI), environment variables,
the ``.env`` file in the working directory, the defaults below. Every default serves the embedded
mode (no servers to install), rooted at ``IMGSYNC_HOME``.

Sub-systems get frozen views (``Settings.encoder``, ``Settings.batching`` ...) passed by keyword;
no other module reads an ``IMGSYNC_*`` variable from ``os.environ``. Two read other variables of
their own: ``worker/encoders/digest.py`` ``XDG_CACHE_HOME`` (where the weights-digest cache lies) and
``worker/sources/sqs.py`` ``AWS_ENDPOINT_URL_SQS`` / ``AWS_ENDPOINT_URL`` (when one is set, boto3
picks the SQS endpoint from it instead of the queue URL's host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

__all__ = [
    "BatchConfig",
    "EncoderConfig",
    "FetchConfig",
    "ImagingConfig",
    "QueueNames",
    "Settings",
    "DEFAULT_MODEL",
    "DEVICE_PATTERN",
]

#: The serving model of a fresh install: a real pretrained CLIP.
DEFAULT_MODEL = "open_clip:ViT-B-32@openai"

#: IMGSYNC_DEVICE values (any case); whether the device exists is checked when the model loads.
DEVICE_PATTERN = r"auto|cpu|cuda(?::\d+)?"

#: pip packages of DBAPI drivers named in SQLAlchemy URLs (``<dialect>+<driver>://``), for install hints
_DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "mysqldb": "mysqlclient",
    "pymysql": "pymysql",
}


@dataclass(frozen=True)
class EncoderConfig:
    """What the encoder factory needs."""

    spec: str
    device: str
    precision: str


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching of the encode queue."""

    max_size: int
    wait_seconds: float
    #: write a micro-batch while the next one's forward pass runs: "auto" (on CUDA), "on", "off"
    overlap: str = "auto"


@dataclass(frozen=True)
class FetchConfig:
    """Limits for fetching image bytes."""

    max_bytes: int
    file_roots: tuple[Path, ...]
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    deadline: float = 60.0
    max_redirects: int = 3
    allow_hosts: tuple[str, ...] = ()
    s3_endpoint_url: str = ""
    s3_region: str = ""
    #: PEM file of the CAs trusted for https:// and S3 over TLS ("": certifi's public bundle)
    ca_bundle: str = ""


@dataclass(frozen=True)
class ImagingConfig:
    """Limits and options for decoding images."""

    max_pixels: int
    min_side: int
    auto_trim: bool = True
    #: who decodes JPEGs: ``preprocess`` (CPU workers, Pillow) or ``encoder`` (the encode worker, on its device)
    jpeg_decode: str = "preprocess"
    #: JPEG files larger than this are decoded by preprocess even with ``jpeg_decode=encoder``
    handoff_max_bytes: int = 16 * 2**20
    #: decoded pixels per device decode call (bounds the device memory a batch's decode takes)
    device_chunk_pixels: int = 256 * 2**20


@dataclass(frozen=True)
class QueueNames:
    """Celery queue names, one per pipeline stage."""

    preprocess: str
    encode: str
    sku: str

    def all(self) -> tuple[str, str, str]:
        return (self.preprocess, self.encode, self.sku)


class _ImgsyncDotEnv(DotEnvSettingsSource):
    """The ``.env`` file's ``IMGSYNC_*`` keys only: the same file may hold other services' variables
    (docker compose reads it too: ``POSTGRES_PASSWORD``, ``MINIO_ROOT_USER`` …). An unknown
    ``IMGSYNC_*`` key is still refused."""

    def _load_env_vars(self):  # type: ignore[no-untyped-def]
        prefix = self.env_prefix.lower()
        return {k: v for k, v in super()._load_env_vars().items() if k.lower().startswith(prefix)}


class Settings(BaseSettings):
    """imgsync settings. Each field is the environment variable ``IMGSYNC_<FIELD>``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        dotenv = _ImgsyncDotEnv(
            settings_cls,
            env_file=getattr(dotenv_settings, "env_file", ".env"),
            env_file_encoding=getattr(dotenv_settings, "env_file_encoding", "utf-8"),
        )
        return init_settings, env_settings, dotenv, file_secret_settings

    model_config = SettingsConfigDict(
        env_prefix="IMGSYNC_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
    )

    home: Path = Field(
        Path(".imgsync"),
        description="Directory for embedded-mode data: broker, state DB, Milvus Lite data, pixel store.",
    )
    broker_url: str = Field(
        "",
        description="Celery broker URL (redis://, amqp://). Empty: a SQLite file under IMGSYNC_HOME.",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the worker state (ledger). Empty: SQLite file under IMGSYNC_HOME.",
    )
    catalog_url: str = Field(
        "", description="SQLAlchemy URL of the product catalog (outbox source). Empty: same as IMGSYNC_DATABASE_URL."
    )
    pixel_store_url: str = Field(
        "",
        description=(
            "Where preprocess hands model-input pixels to encode: redis://… (entries expire after "
            "IMGSYNC_PIXEL_TTL_SECONDS) or a directory path shared by the workers. Empty: the broker's "
            "Redis when the broker is Redis, else IMGSYNC_HOME/pixels."
        ),
    )
    pixel_ttl_seconds: int = Field(
        3600,
        ge=60,
        description="Pixel entries older than this are dropped; encode then redoes the preprocessing.",
    )
    milvus_uri: str = Field(
        "",
        description="Milvus URI (http://host:19530). Empty: the embedded Milvus Lite server under IMGSYNC_HOME.",
    )
    milvus_token: str = Field("", description="Milvus token (user:password), if the server needs one.")
    milvus_index_type: Literal["AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW"] = Field(
        "AUTOINDEX", description="Vector index of new collections (HNSW needs Milvus standalone/cluster)."
    )
    milvus_index_params: Annotated[dict[str, int | float | str], NoDecode] = Field(
        default_factory=dict,
        description='Build parameters of that index as JSON, e.g. {"M": 16, "efConstruction": 200} for HNSW.',
    )
    milvus_search_params: Annotated[dict[str, int | float | str], NoDecode] = Field(
        default_factory=dict, description='Search parameters as JSON, e.g. {"ef": 64} for HNSW, {"nprobe": 16} for IVF_FLAT.'
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="Model spec <backend>:<name>[@<weights>]; backends open_clip, hf, timm, tiny (and random:<dim>, a control).",
    )
    device: str = Field("auto", description="Torch device: auto, cpu, cuda or cuda:N.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Inference precision on CUDA (CPU always runs fp32)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description=(
            "CPU threads of the model in a worker. 0: torch's default (one per core). Measured on 2 cores "
            "beside the preprocess workers: the default was ~9 % faster end to end than 1 thread."
        ),
    )
    batch_max: int = Field(
        32,
        ge=1,
        le=4096,
        description="Encode micro-batch: flush when this many images wait (a batch message counts for each of its "
        "images) and run the model on at most this many at once.",
    )
    preprocess_batch: int = Field(
        16, ge=1, le=256,
        description="Images per preprocess message at most. A submission of n ≥ 128 images travels as messages of "
        "min(n/64, this) images (one broker message, pool round trip and ack per message); smaller ones one per message.",
    )  # fmt: skip
    batch_wait_ms: int = Field(
        200, ge=1, le=60_000, description="Encode micro-batch: flush after this many ms when not full."
    )
    encode_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Encode worker: write micro-batches (Milvus, ledger) in writer threads of their own while the next ones are "
            "received and their forward passes run; a batch's messages are acknowledged once it is written. auto: on when "
            "the model runs on CUDA (its forward pass is asynchronous there; on a CPU the threads would only compete for "
            "the cores). Only in a worker with the solo pool (a GPU worker)."
        ),
    )
    max_image_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest image file accepted, in bytes."
    )
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="Largest decoded image accepted, in pixels (bomb guard)."
    )
    min_image_side: int = Field(8, ge=1, description="Images with a side shorter than this are refused.")
    file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local folders file:// URIs may read from (comma-separated). Empty: any local path.",
    )
    fetch_connect_timeout: float = Field(5.0, gt=0, le=120, description="HTTP/S3 connect timeout, seconds.")
    fetch_read_timeout: float = Field(15.0, gt=0, le=600, description="HTTP/S3 read timeout between bytes, seconds.")
    fetch_deadline: float = Field(60.0, gt=0, le=3600, description="Total time allowed for one download, seconds.")
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="HTTP redirects followed (each re-checked).")
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts or CIDRs that may be fetched although private/loopback (comma-separated).",
    )
    fetch_ca_bundle: Path | None = Field(
        None,
        description="PEM file of the certificate authorities trusted for https:// and S3 fetches (a private CA of an "
        "internal CDN or MinIO). Empty: the public CAs (certifi).",
    )
    auto_trim: bool = Field(True, description="Trim a uniform (white or transparent) border when no crop is given.")
    jpeg_decode: Literal["preprocess", "encoder"] = Field(
        "preprocess",
        description="Who decodes JPEGs. preprocess: the CPU workers (Pillow, at a reduced DCT scale). encoder: the encode "
        "worker, a batch at once on its device (nvJPEG on CUDA), for GPU workers whose CPUs cannot decode as fast as the "
        "model encodes; preprocess then only checks the header and hands the bytes over. Only pays off on CUDA.",
    )
    jpeg_handoff_max_bytes: int = Field(
        16 * 2**20, ge=1, description="With IMGSYNC_JPEG_DECODE=encoder: larger JPEG files are decoded by preprocess (they travel through the pixel store)."
    )
    device_decode_chunk_pixels: int = Field(
        256 * 2**20, ge=1, description="With IMGSYNC_JPEG_DECODE=encoder: decoded pixels per device decode call (bounds its device memory)."
    )
    queue_preprocess: str = Field("preprocess", description="Queue name of the preprocess stage.")
    queue_encode: str = Field("encode", description="Queue name of the encode stage.")
    queue_sku: str = Field("sku", description="Queue name of the SKU refresh stage.")
    worker_concurrency: int = Field(
        0, ge=0, le=256, description="Prefork processes of a CPU worker. 0: one per CPU core (`up`/`demo`: at most 4)."
    )
    max_retries: int = Field(5, ge=0, le=100, description="Retries of a transient failure before giving up.")
    retry_backoff_max: float = Field(
        300.0, ge=0.1, le=3600, description="Longest pause between two attempts of a transient failure, seconds."
    )
    broker_visibility_timeout: int = Field(
        900,
        ge=5,
        le=86_400,
        description=(
            "Redis broker: seconds before a message taken by a worker that died unacknowledged is delivered "
            "again. Must be at least 2 × IMGSYNC_RETRY_BACKOFF_MAX (retries wait unacknowledged in the worker)."
        ),
    )
    health_probe_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Encode worker: seconds between health probes of Milvus and the device while it is paused.",
    )
    redrive_interval_seconds: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description=(
            "Seconds between two looks for work the ledger still waits for but no broker message carries any "
            "more (a message a broker lost); one CPU worker node looks and sends it again. 0: never."
        ),
    )
    redrive_after_seconds: float = Field(
        0.0,
        ge=0,
        le=7 * 86_400,
        description=(
            "An image pending (or a SKU awaiting refresh) this long, while its queues are empty, is sent again. "
            "0: IMGSYNC_BROKER_VISIBILITY_TIMEOUT + IMGSYNC_RETRY_BACKOFF_MAX."
        ),
    )
    s3_endpoint_url: str = Field("", description="S3 endpoint (MinIO, moto) for s3:// fetches. Empty: AWS default.")
    s3_region: str = Field("", description="S3 region for s3:// fetches. Empty: the AWS default chain.")
    sqs_queue_url: str = Field("", description="SQS queue URL of the S3 event source (`imgsync sources sqs`).")
    sqs_wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait per receive call, seconds.")
    sqs_visibility_timeout: int = Field(
        300, ge=0, le=43_200, description="Seconds a received SQS message stays hidden before it is redelivered."
    )
    s3_key_pattern: str = Field(
        r"^(?:.*/)?(?P<sku>[^/]+)/[^/]+$",
        description="Regex over an S3 object key; its named group `sku` gives the SKU (default: <prefix>/<sku>/<file>).",
    )
    s3_ignore_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="S3 key prefixes whose events are ignored, e.g. the index's own outputs (comma-separated).",
    )
    webhook_host: str = Field("127.0.0.1", description="Listen address of `imgsync sources webhook`.")
    webhook_port: int = Field(8477, ge=0, le=65535, description="Listen port of `imgsync sources webhook`.")
    webhook_token: str = Field(
        "", description="Bearer token MinIO must send to the webhook (required to start it)."
    )
    webhook_max_body: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Largest webhook request body accepted, bytes."
    )
    outbox_poll_seconds: float = Field(
        1.0, gt=0, le=300, description="Outbox relay: polling interval when no notification arrives, seconds."
    )
    outbox_batch: int = Field(200, ge=1, le=10_000, description="Outbox relay: rows claimed per transaction.")
    watch_folder: Path | None = Field(
        None,
        description="Folder `<sku>/<image>` watched by the folder source (and `imgsync up`). Empty: IMGSYNC_HOME/catalog.",
    )
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus exporter port of a worker node or a long-running event source. 0: none.")
    metrics_dir: Path | None = Field(
        None,
        description="Prometheus multiprocess directory shared by a node's processes. Empty: a fresh one per node under IMGSYNC_HOME/metrics.",
    )

    @field_validator("file_roots", "fetch_allow_hosts", "s3_ignore_prefixes", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("fetch_ca_bundle", mode="before")
    @classmethod
    def _ca_bundle(cls, value: object) -> object:
        if value in ("", None):
            return None
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise ValueError(f"{value!r} is not a file (a PEM bundle of CA certificates)")
        return path.resolve()

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _allow_hosts(cls, value: list[str]) -> list[str]:
        """Each entry an IP address, a CIDR or a host name (as DNS knows it: ``xn--`` form); an
        entry that is none of them matched nothing, silently."""
        import ipaddress

        out = []
        for entry in value:
            bare = entry.strip()
            if bare.startswith("[") and bare.endswith("]"):  # an IPv6 address as URLs write it
                bare = bare[1:-1]
            try:
                out.append(str(ipaddress.ip_network(bare, strict=False)))
                continue
            except ValueError:
                pass
            try:
                name = bare.encode("idna").decode("ascii").lower()
            except UnicodeError:
                name = ""
            if not name or not all(part and all(c.isalnum() or c in "-_" for c in part) for part in name.split(".")):
                raise ValueError(f"{entry!r} is neither a host name, an IP address nor a CIDR such as 10.0.0.0/8")
            out.append(name)
        return out

    @field_validator("milvus_index_params", "milvus_search_params", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            import json

            text = value.strip()
            if not text:
                return {}
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
        return value

    @field_validator("s3_key_pattern", mode="after")
    @classmethod
    def _key_pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "sku" not in compiled.groupindex:
            raise ValueError("needs a named group (?P<sku>...) that captures the SKU")
        return value

    @field_validator("pixel_store_url", mode="after")
    @classmethod
    def _pixel_store_kind(cls, value: str) -> str:
        if "://" in value and not value.startswith(("redis://", "rediss://")):
            raise ValueError(f"must be redis://… or a directory path, got {value!r}")
        return value

    # The URL checks raise ConfigError, not ValueError: pydantic would echo the raw value, password and all.

    @field_validator("database_url", "catalog_url", mode="after")
    @classmethod
    def _database_url(cls, value: str, info: ValidationInfo) -> str:
        if value:
            _check_database_url(value, f"IMGSYNC_{str(info.field_name).upper()}")
        return value

    @field_validator("broker_url", "milvus_uri", mode="after")
    @classmethod
    def _service_url(cls, value: str, info: ValidationInfo) -> str:
        if value:
            {"broker_url": _check_broker_url, "milvus_uri": _check_milvus_uri}[str(info.field_name)](value)
        return value

    @field_validator("device", mode="after")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value.strip().lower()):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        home = value.expanduser().resolve()
        odd = sorted({c for c in str(home) if c in "?#%"})
        if odd:  # the embedded SQLite URLs (sqlite:///<home>/state.db) would end or decode there
            raise ValueError(f"{str(home)!r} holds {' '.join(odd)}, which a SQLite URL cannot hold: choose a folder without them")
        return home

    @model_validator(mode="after")
    def _visibility_covers_retries(self) -> Settings:
        if self.broker_visibility_timeout < 2 * self.retry_backoff_max:
            raise ValueError(
                f"IMGSYNC_BROKER_VISIBILITY_TIMEOUT ({self.broker_visibility_timeout} s) must be at least "
                f"2 × IMGSYNC_RETRY_BACKOFF_MAX ({self.retry_backoff_max} s): a retry waiting in a worker "
                "longer than the visibility timeout is delivered twice"
            )
        return self

    # --- derived values -------------------------------------------------------------------------

    @property
    def effective_redrive_after(self) -> float:
        """Seconds after which stalled work is sent again: by then any message a worker held unacknowledged
        was delivered again, and any retry it waited for was due."""
        return self.redrive_after_seconds or float(self.broker_visibility_timeout + self.retry_backoff_max)

    @property
    def embedded_broker(self) -> bool:
        """True when the broker is the SQLite file under ``home``."""
        return not self.broker_url

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        from worker.embedded_broker import broker_url  # registers the embedded broker's kombu transport

        return broker_url(self.broker_db_path)

    @property
    def broker_db_path(self) -> Path:
        """The embedded broker's SQLite file (used when IMGSYNC_BROKER_URL is empty)."""
        return self.home / "broker.db"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'state.db'}"

    @property
    def effective_catalog_url(self) -> str:
        return self.catalog_url or self.effective_database_url

    @property
    def effective_watch_folder(self) -> Path:
        return (self.watch_folder or self.home / "catalog").expanduser().resolve()

    @property
    def pixel_dir(self) -> Path:
        return self.home / "pixels"

    @property
    def effective_pixel_store(self) -> str:
        """``redis://…`` or a directory path (see ``pixel_store_url``)."""
        if self.pixel_store_url:
            return self.pixel_store_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return str(self.pixel_dir)

    @property
    def milvus_data_dir(self) -> Path:
        return self.home / "milvus"

    @property
    def encoder(self) -> EncoderConfig:
        return EncoderConfig(spec=self.model, device=self.device, precision=self.precision)

    @property
    def batching(self) -> BatchConfig:
        return BatchConfig(max_size=self.batch_max, wait_seconds=self.batch_wait_ms / 1000.0, overlap=self.encode_overlap)

    @property
    def fetch(self) -> FetchConfig:
        return FetchConfig(
            max_bytes=self.max_image_bytes,
            file_roots=tuple(p.expanduser().resolve() for p in self.file_roots),
            connect_timeout=self.fetch_connect_timeout,
            read_timeout=self.fetch_read_timeout,
            deadline=self.fetch_deadline,
            max_redirects=self.fetch_max_redirects,
            allow_hosts=tuple(self.fetch_allow_hosts),
            s3_endpoint_url=self.s3_endpoint_url,
            s3_region=self.s3_region,
            ca_bundle=str(self.fetch_ca_bundle or ""),
        )

    @property
    def imaging(self) -> ImagingConfig:
        return ImagingConfig(
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
            auto_trim=self.auto_trim,
            jpeg_decode=self.jpeg_decode,
            handoff_max_bytes=self.jpeg_handoff_max_bytes,
            device_chunk_pixels=self.device_decode_chunk_pixels,
        )

    @property
    def queues(self) -> QueueNames:
        return QueueNames(preprocess=self.queue_preprocess, encode=self.queue_encode, sku=self.queue_sku)

    def as_env(self) -> dict[str, str]:
        """These settings as ``IMGSYNC_*`` variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, dict):
                import json

                value = json.dumps(value)
            env[f"IMGSYNC_{name.upper()}"] = str(value)
        return env


def _check_database_url(url: str, setting: str) -> None:
    """Refuse a database URL SQLAlchemy cannot parse or whose dialect or driver is not installed.

    Raises:
        ConfigError: naming ``setting``, with the password masked (and an install hint for a driver).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from worker.errors import ConfigError, hide_passwords

    shown = hide_passwords(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise ConfigError(
            f"{setting}={shown!r}: unknown database dialect {url.partition(':')[0]!r} "
            "(imgsync runs on postgresql+psycopg:// and sqlite:///)"
        ) from exc
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{setting}={shown!r} is not a SQLAlchemy URL ({exc}); e.g. "
            "postgresql+psycopg://user:password@host:5432/db or sqlite:////absolute/path/state.db"
        ) from exc
    if parsed.host and "@" in parsed.host:  # an @ in the password, not percent-encoded: the rest is taken for the host
        raise ConfigError(
            f"{setting}: its password holds an '@' that is not percent-encoded (write it %40; also : / % # ? as "
            "%3A %2F %25 %23 %3F), so part of it was read as the host"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = parsed.get_driver_name()
        package = _DRIVER_PACKAGES.get(driver, exc.name or driver)
        raise ConfigError(
            f"{setting}={shown!r}: its database driver {driver!r} is not installed ({exc}); "
            f"install it (pip install {package}) or name an installed one, e.g. postgresql+psycopg://…"
        ) from exc


def _check_broker_url(url: str) -> None:
    """Refuse a broker URL (or ``;``-separated failover list) with a scheme kombu has no transport for.

    Raises:
        ConfigError: naming IMGSYNC_BROKER_URL and the valid schemes, with the password masked.
    """
    from kombu.transport import TRANSPORT_ALIASES

    from worker.embedded_broker import SCHEME  # noqa: F401 - importing it registers imgsync's own transport
    from worker.errors import ConfigError, hide_passwords

    for one in url.split(";"):
        scheme, sep, _ = one.strip().partition("://")
        if sep and scheme.split("+", 1)[0] in TRANSPORT_ALIASES:  # kombu reads sqla+sqlite:// as transport sqla
            continue
        problem = f"unknown broker transport {scheme!r}" if sep else "not a URL <scheme>://…"
        raise ConfigError(
            f"IMGSYNC_BROKER_URL={hide_passwords(url)!r}: {problem}; valid schemes: "
            f"{', '.join(sorted(TRANSPORT_ALIASES, key=str.lower))} (e.g. redis://host:6379/0, "
            "amqp://user:password@host:5672//); empty: the embedded broker under IMGSYNC_HOME"
        )


def _check_milvus_uri(uri: str) -> None:
    """Refuse a Milvus URI pymilvus would not take: ``http(s)://`` or ``tcp://`` with a host (and a
    valid port, if any), ``unix:<socket>``, or a local Milvus Lite file ending in ``.db``.

    Raises:
        ConfigError: naming IMGSYNC_MILVUS_URI and the valid forms.
    """
    from urllib.parse import urlsplit

    from worker.errors import ConfigError, hide_passwords

    if uri.startswith("unix:") or uri.endswith(".db"):
        return
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError:  # also a malformed IPv6 host
        pass
    else:
        if parts.scheme.lower() in ("http", "https", "tcp") and parts.hostname:
            return
    raise ConfigError(
        f"IMGSYNC_MILVUS_URI={hide_passwords(uri)!r} is not a Milvus URI: use http(s)://host:19530, tcp://host:19530, "
        "unix:/path/to/socket or a local Milvus Lite file ending in .db; empty: the embedded server under IMGSYNC_HOME"
    )
