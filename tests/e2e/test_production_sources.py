"""The production settings on this machine's real services: Redis broker, PostgreSQL state and
catalog, the Milvus Lite server standing in for Milvus standalone, moto server for S3 + SQS, CPU and
encode workers. A catalog insert (outbox relay) and an S3 upload (SQS source) each end up searchable
through `imgsync search`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from schemas.events import image_id_for, normalize_uri
from tests.helpers import photo
from tests.stack import running_stack
from worker.ledger import Ledger, make_engine

pytestmark = pytest.mark.e2e

REGION = "us-east-1"


def test_catalog_insert_and_s3_upload_are_searchable(
    tmp_path: Path, pg_database, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(key, value)  # inherited by the stack's workers and the source processes
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    sqs = boto3.client("sqs", endpoint_url=moto_endpoint, region_name=REGION)
    bucket = f"shop-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"events-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
    )
    extra = {
        "IMGSYNC_CATALOG_URL": pg_database(),
        "IMGSYNC_S3_ENDPOINT_URL": moto_endpoint,
        "IMGSYNC_S3_REGION": REGION,
        "IMGSYNC_SQS_QUEUE_URL": queue,
        "IMGSYNC_SQS_WAIT_SECONDS": "1",
    }
    with running_stack(tmp_path / "stack", "production", pg_database=pg_database, extra_env=extra) as st:
        # the store application writes its catalog; the relay turns it into events
        local = tmp_path / "photos" / "catalog-photo.jpg"
        local.parent.mkdir()
        photo(400, 300, seed=11).save(local, quality=90)
        assert st.cli("db", "upgrade").returncode == 0
        catalog = make_engine(st.settings.effective_catalog_url)
        with catalog.begin() as conn:
            pid = conn.execute(sa.text("INSERT INTO products (sku) VALUES ('CAT-1') RETURNING id")).scalar_one()
            conn.execute(
                sa.text("INSERT INTO product_images (product_id, uri) VALUES (:p, :u)"), {"p": pid, "u": str(local)}
            )
        catalog.dispose()
        relay = subprocess.run(
            [sys.executable, "-m", "worker.cli", "sources", "outbox", "--once"],
            env=st.env, capture_output=True, text=True, timeout=120,
        )
        assert relay.returncode == 0, relay.stderr[-2000:]

        # an upload to the bucket; the SQS source turns its notification into an event
        buf = io.BytesIO()
        photo(400, 300, seed=22).save(buf, "JPEG", quality=90)
        s3.put_object(Bucket=bucket, Key="products/S3-1/front.jpg", Body=buf.getvalue())
        uploaded = tmp_path / "uploaded.jpg"
        uploaded.write_bytes(buf.getvalue())
        source = subprocess.run(
            [sys.executable, "-m", "worker.cli", "sources", "sqs", "--once"],
            env=st.env, capture_output=True, text=True, timeout=120,
        )
        assert source.returncode == 0, source.stderr[-2000:]

        ledger = Ledger(make_engine(st.settings.effective_database_url))
        want = {
            image_id_for(normalize_uri(str(local))): ("CAT-1", local),
            image_id_for(f"s3://{bucket}/products/S3-1/front.jpg"): ("S3-1", uploaded),
        }
        deadline = time.monotonic() + 180
        while {i: r.state for i, r in ledger.rows(list(want)).items()} != dict.fromkeys(want, "indexed"):
            assert time.monotonic() < deadline, {i: r.state for i, r in ledger.rows(list(want)).items()}
            time.sleep(0.5)
        for image_id, (sku, query) in want.items():
            found = st.cli("search", "--image", str(query), "--limit", "1", "--json")
            assert found.returncode == 0, found.stderr[-2000:]
            hit = json.loads(found.stdout)["hits"][0]
            assert (hit["image_id"], hit["sku"]) == (image_id, sku) and hit["score"] > 0.99
        ledger.engine.dispose()
