"""The ImageEvent contract: normalized uris, stable ids, sortable versions, strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import Action, CropBox, ImageEvent, image_id_for, normalize_uri, normalize_version
from schemas.tasks import PreprocessPayload


def test_local_paths_become_file_uris(tmp_path: Path) -> None:
    """A relative or absolute path and its file:// form normalize to the same uri."""
    p = tmp_path / "a b" / "x+y.jpg"
    assert normalize_uri(str(p)) == p.resolve().as_uri()
    assert normalize_uri(p.resolve().as_uri()) == p.resolve().as_uri()


def test_a_symbolic_link_is_named_by_where_it_lies(tmp_path: Path) -> None:
    """Local paths are normalized lexically: a link keeps its own uri (its own image, in its own
    SKU folder), `.`/`..`/repeated slashes and file://localhost are folded, a remote host refused."""
    target = tmp_path / "SKU-A" / "real.jpg"
    target.parent.mkdir()
    target.write_bytes(b"x")
    link = tmp_path / "SKU-B" / "alias.jpg"
    link.parent.mkdir()
    link.symlink_to(target)
    assert normalize_uri(str(link)) == link.as_uri() != target.as_uri()
    for form in (f"{tmp_path}/SKU-B/./alias.jpg", f"{tmp_path}/SKU-A/../SKU-B/alias.jpg", f"/{tmp_path}//SKU-B/alias.jpg",
                 link.as_uri(), f"file://localhost{link}", f"file:///{tmp_path}/SKU-B/alias.jpg"):  # fmt: skip
        assert normalize_uri(form) == link.as_uri(), form
    assert normalize_uri(f"file://{tmp_path}/a%20b/caf%C3%A9.jpg") == (tmp_path / "a b" / "café.jpg").as_uri()
    with pytest.raises(ValueError, match="local"):
        normalize_uri("file://fileserver/share/x.jpg")


def test_uris_normalized_between_stages_are_taken_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encode payload's uri was normalized where the message was made: the encode worker takes
    a uri in normal form as it is (the image id stays the one the ledger row has), and normalizes
    one that is not."""
    from schemas import events
    from tasks.base import encode_payloads

    target = tmp_path / "real.jpg"
    as_made = target.as_uri()
    calls: list[str] = []
    real = events.normalize_uri
    monkeypatch.setattr(events, "normalize_uri", lambda v: calls.append(v) or real(v))
    item = {"event": {"uri": as_made, "sku": "S"}, "content_hash": "h", "pixel_key": "k"}
    (payload,) = encode_payloads(({"items": [item]},), {})
    assert payload.event.uri == as_made and payload.event.image_id == image_id_for(as_made)
    assert calls == []  # not parsed again

    unusual = [f"file://{tmp_path}/./real.jpg", f"file://{tmp_path}/sub/../real.jpg", f"file:///{tmp_path}/real.jpg",
               str(target), f" {as_made}"]  # fmt: skip
    items = [{"event": {"uri": u, "sku": "S"}, "content_hash": "h", "pixel_key": "k"} for u in unusual]
    assert [p.event.uri for p in encode_payloads(({"items": items},), {})] == [as_made] * len(unusual)
    assert len(calls) == len(unusual)
    # without the context (a source's event), every uri is normalized
    assert ImageEvent.model_validate({"uri": as_made, "sku": "S"}).uri == as_made
    assert len(calls) == len(unusual) + 1


def test_remote_uris_kept_and_bad_schemes_refused() -> None:
    """s3/http uris are kept as given; unknown schemes and missing hosts are refused."""
    assert normalize_uri("s3://bucket/a/b.jpg") == "s3://bucket/a/b.jpg"
    with pytest.raises(ValueError, match="ftp"):
        normalize_uri("ftp://host/x.jpg")
    with pytest.raises(ValueError, match="no host"):
        normalize_uri("s3:///key.jpg")


def test_image_id_is_stable_per_uri() -> None:
    """The same uri always gives the same id; another uri another id."""
    a = ImageEvent(uri="s3://b/k/1.jpg", sku="S")
    b = ImageEvent(uri="s3://b/k/1.jpg", sku="T", action=Action.delete)
    assert a.image_id == b.image_id == image_id_for("s3://b/k/1.jpg")
    assert len(a.image_id) == 32
    assert ImageEvent(uri="s3://b/k/2.jpg", sku="S").image_id != a.image_id


def test_versions_sort_numerically() -> None:
    """Padded versions compare as numbers: 9 < 10, hex sequencers of different length too."""
    assert normalize_version(9) < normalize_version(10)
    assert normalize_version("0055B9E6A0C2C3E5D4") < normalize_version("0055B9E6A0C2C3E5D5")
    assert normalize_version("ff") == normalize_version("FF")
    with pytest.raises(ValueError):
        normalize_version("12:30")
    later = ImageEvent(uri="s3://b/k", sku="S")
    assert ImageEvent(uri="s3://b/k", sku="S", version=1).version < later.version


def test_crop_box_must_stay_inside() -> None:
    """A crop reaching outside the unit square is refused."""
    CropBox(x=0.5, y=0.5, w=0.5, h=0.5)
    with pytest.raises(ValidationError):
        CropBox(x=0.6, y=0.0, w=0.5, h=0.5)


def test_unknown_fields_and_empty_sku_refused() -> None:
    """Events are strict: no unknown fields, no empty or control-character SKUs."""
    with pytest.raises(ValidationError):
        ImageEvent(uri="s3://b/k", sku="S", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ImageEvent(uri="s3://b/k", sku="  ")
    with pytest.raises(ValidationError):
        ImageEvent(uri="s3://b/k", sku="a\nb")


def test_payload_json_round_trip() -> None:
    """Task payloads survive JSON (the only message format) unchanged."""
    p = PreprocessPayload(event=ImageEvent(uri="s3://b/k.jpg", sku="S", crop=CropBox(x=0, y=0, w=1, h=1)), request_id="r")
    assert PreprocessPayload.model_validate_json(p.model_dump_json()) == p


def test_sku_refresh_payload_takes_one_sku_or_many() -> None:
    from pydantic import ValidationError

    from schemas.tasks import SkuRefreshPayload

    assert SkuRefreshPayload.model_validate({"sku": "A"}).all_skus == ["A"]  # a message from before batching
    assert SkuRefreshPayload.model_validate({"skus": ["B", "A", "B"], "sku": "C"}).all_skus == ["A", "B", "C"]
    for bad in ({}, {"sku": ""}, {"skus": []}, {"skus": [""]}, {"sku": "A", "extra": 1}):
        with pytest.raises(ValidationError):
            SkuRefreshPayload.model_validate(bad)
