"""Fixtures shared by the S3 sources' tests (SQS and the MinIO webhook): test AWS credentials and one
embedded stack per module whose workers fetch s3:// objects from the moto server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import Stack, running_stack

REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Test credentials for this process and the stack's workers; nothing from ~/.aws."""
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def stack(aws, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """One embedded stack per test module whose workers fetch s3:// objects from the moto server
    (modules with a stack of their own define their own ``stack`` fixture)."""
    extra = {"IMGSYNC_S3_ENDPOINT_URL": moto_endpoint, "IMGSYNC_S3_REGION": REGION}
    name = request.module.__name__.rsplit(".", 1)[-1]
    with running_stack(tmp_path_factory.mktemp(f"{name}-stack"), extra_env=extra) as st:
        yield st
