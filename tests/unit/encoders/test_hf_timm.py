"""hf (transformers) and timm backends: small random models saved to disk, loaded by local path
through imgsync's factory, compared with each library's own reference path (no hub here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import photo
from worker.encoders import create_encoder
from worker.errors import ConfigError

SIZES = [(320, 240), (100, 400), (64, 64), (33, 517), (71, 64), (257, 129)]


def images() -> list[Image.Image]:
    return [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


def vision(**extra):  # type: ignore[no-untyped-def]
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=64, patch_size=16, **extra)


def text(**extra):  # type: ignore[no-untyped-def]
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=64, **extra)


def save_family(family: str, folder: Path) -> Path:
    """A tiny random model of ``family`` with its image processor, in save_pretrained layout."""
    import transformers as tf

    torch.manual_seed(1)
    if family == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text(bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=vision(), projection_dim=24))
        proc = tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    elif family == "chinese_clip":
        model = tf.ChineseCLIPModel(tf.ChineseCLIPConfig(text_config=text(), vision_config=vision(), projection_dim=24))
        proc = tf.ChineseCLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    elif family == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text(), vision_config=vision()))
        proc = tf.SiglipImageProcessor(size={"height": 64, "width": 64})
    elif family == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16))
        proc = tf.BitImageProcessor(
            size={"shortest_edge": 72},
            crop_size={"height": 64, "width": 64},
            do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    else:  # pragma: no cover
        raise AssertionError(family)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def hf_reference(folder: Path, family: str, pics: list[Image.Image]) -> np.ndarray:
    """transformers' own path: AutoImageProcessor + get_image_features (or DINOv2's pooled CLS)."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        x = proc(images=pics, return_tensors="pt")["pixel_values"]
        if family == "dinov2":
            out = model(pixel_values=x).pooler_output
        else:
            out = model.get_image_features(pixel_values=x)
            out = getattr(out, "pooler_output", out)
    v = out.float().numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("family", ["clip", "chinese_clip", "siglip", "dinov2"])
def test_hf_matches_transformers_reference(family: str, tmp_path: Path) -> None:
    """Each HF family loaded from a local folder: cos >= 0.9999 to transformers' own path, per image."""
    folder = save_family(family, tmp_path / family)
    enc = create_encoder(f"hf:{folder}").load()
    pics = images()
    ours = enc.encode(enc.preprocess(pics))
    ref = hf_reference(folder, family, pics)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    assert enc.dim == ref.shape[1] and enc.model_id.startswith("hf:") and "@dir-" in enc.model_id
    assert ("text" in enc.capabilities) == (family != "dinov2")


def test_dinov2_has_no_text_tower(tmp_path: Path) -> None:
    """Text search with a vision-only model is a clear ConfigError."""
    enc = create_encoder(f"hf:{save_family('dinov2', tmp_path / 'd')}").load()
    with pytest.raises(ConfigError, match="no text tower"):
        enc.encode_text(["a shoe"])


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_hf_checkpoint_missing_weights_is_refused(family: str, tmp_path: Path) -> None:
    """A checkpoint lacking some of the model's weights (here the vision tower's last layer) is a
    ConfigError naming them: transformers would load it with those weights random, printing a report only."""
    from safetensors.torch import load_file, save_file

    folder = save_family(family, tmp_path / family)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    gone = [k for k in state if ".layer.1." in k or ".layers.1." in k]  # the last of the 2 layers
    assert gone
    save_file({k: v for k, v in state.items() if k not in gone}, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"lacks \d+ weight"):
        create_encoder(f"hf:{folder}").load()


def test_siglip2_naflex_processor_is_refused_clearly() -> None:
    """A SigLIP2 NaFlex (variable-resolution) image processor is a ConfigError saying so, not a
    puzzle about the input size."""
    import transformers as tf

    from worker.encoders.hf_backend import _cfg_from_processor

    with pytest.raises(ConfigError, match="NaFlex"):
        _cfg_from_processor(tf.Siglip2ImageProcessor(), "hf:siglip2")


def test_hf_missing_folder_and_unsupported_type(tmp_path: Path) -> None:
    """A missing folder, or a model type we do not embed with, fails naming the setting."""
    with pytest.raises(ConfigError, match="IMGSYNC_MODEL"):
        create_encoder(f"hf:{tmp_path}/nope").load()
    import transformers as tf

    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="not supported"):
        create_encoder(f"hf:{tmp_path / 'bert'}").load()


def test_timm_matches_timm_reference(tmp_path: Path) -> None:
    """timm model from a local checkpoint: cos >= 0.9999 to timm's create_transform + forward."""
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(5)
    ref_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    ckpt = tmp_path / "vit_tiny.pth"
    torch.save(ref_model.state_dict(), ckpt)
    enc = create_encoder(f"timm:vit_tiny_patch16_224@{ckpt}").load()
    assert enc.preprocess_cfg.resize_to == 248 and enc.dim == 192  # crop_pct 0.9 of 224
    pics = images()
    ours = enc.encode(enc.preprocess(pics))
    transform = create_transform(**resolve_data_config({}, model=ref_model))
    with torch.no_grad():
        ref = ref_model(torch.stack([transform(p) for p in pics])).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert (ours * ref).sum(axis=1).min() >= 0.9999
    assert "@file-" in enc.model_id
    with pytest.raises(ConfigError, match="no text tower"):
        enc.encode_text(["x"])


@pytest.mark.parametrize("form", ["pth", "safetensors", "state_dict"])
def test_timm_checkpoint_with_its_classifier_loads(tmp_path: Path, form: str) -> None:
    """A checkpoint as timm training and the hub keep it (classifier head included; .pth,
    .safetensors or under "state_dict") loads into the feature model: the pooled features of the
    same weights. A checkpoint of another architecture is refused, never left as random weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # with its 1000-class head
    state = full.state_dict()
    ckpt = tmp_path / f"vit.{'safetensors' if form == 'safetensors' else 'pth'}"
    if form == "safetensors":
        save_file(state, ckpt)
    else:
        torch.save({"state_dict": state} if form == "state_dict" else state, ckpt)
    enc = create_encoder(f"timm:vit_tiny_patch16_224@{ckpt}").load()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = full.forward_head(full.forward_features(x), pre_logits=True)
        ours = enc.model(x)
    assert torch.nn.functional.cosine_similarity(ours, ref).min() > 0.9999

    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(ConfigError, match="cannot load weights"):
        create_encoder(f"timm:vit_tiny_patch16_224@{other}").load()


def test_timm_cnn_and_unknown_model() -> None:
    """A CNN (resnet18, random weights) works as a 512-d extractor; an unknown name is a ConfigError."""
    enc = create_encoder("timm:resnet18").load()
    v = enc.encode(enc.preprocess([photo(200, 150, seed=1)]))
    assert v.shape == (1, 512) and abs(float(np.linalg.norm(v)) - 1) < 1e-5
    with pytest.raises(ConfigError, match="no_such_net"):
        create_encoder("timm:no_such_net").load()


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (no hub): enough to drive the text tower."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("a red blue shoe bag leather".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=64).save_pretrained(folder)


@pytest.mark.parametrize("family", ["clip", "chinese_clip", "siglip"])
def test_hf_text_tower_matches_reference(family: str, tmp_path: Path) -> None:
    """Text vectors equal transformers' get_text_features on the model's own tokenizer output."""
    from transformers import AutoModel, AutoTokenizer

    folder = save_family(family, tmp_path / family)
    save_tokenizer(folder)
    enc = create_encoder(f"hf:{folder}").load()
    texts = ["a red shoe", "blue leather bag"]
    ours = enc.encode_text(texts)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tok(texts, padding="max_length" if family == "siglip" else True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ref = getattr(out, "pooler_output", out).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert ours.shape == (2, enc.dim) and (ours * ref).sum(axis=1).min() >= 0.9999


def test_hf_text_without_tokenizer_is_config_error(tmp_path: Path) -> None:
    """A CLIP folder saved without its tokenizer: text search fails with a clear ConfigError."""
    enc = create_encoder(f"hf:{save_family('clip', tmp_path / 'c')}").load()
    with pytest.raises(ConfigError, match="tokenizer"):
        enc.encode_text(["a shoe"])


def test_random_init_is_the_same_under_concurrent_builds() -> None:
    """torch's RNG is process-global: models built by several threads at once must still get the
    seeded weights (a search thread building the query model while another builds it too)."""
    import threading

    import numpy as np

    from tests.helpers import photo

    reference = create_encoder("timm:resnet10t").load()
    px = reference.preprocess([photo(96, 80, seed=1)])
    want = reference.encode(px)[0]
    built: list = []

    def build() -> None:
        built.append(create_encoder("timm:resnet10t").load())

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for enc in built:
        assert float(np.dot(enc.encode(px)[0], want)) > 0.99999


def test_a_relative_path_names_the_same_model_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec with a relative folder or checkpoint is anchored where it is read: `hf:./m` and
    `hf:/abs/m` are one model_id, and the spec kept for other workers is the absolute one."""
    from worker.encoders.spec import anchored_spec

    folder = save_family("dinov2", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert anchored_spec("hf:./m") == f"hf:{folder}"
    assert create_encoder("hf:./m").model_id == create_encoder(f"hf:{folder}").model_id
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    assert anchored_spec("timm:vit_tiny_patch16_224@w.pth") == f"timm:vit_tiny_patch16_224@{ckpt}"
    assert anchored_spec("open_clip:local-dir:m") == f"open_clip:local-dir:{folder}"
    for kept in ("open_clip:ViT-B-32@openai", "hf:openai/clip-vit-base-patch32", "tiny", "random:64"):
        assert anchored_spec(kept) == kept  # tags and hub ids stay as written


class _SpyProcessor:
    """The model's own image processor, noting the sizes of the pictures it is handed."""

    def __init__(self, proc) -> None:  # type: ignore[no-untyped-def]
        self.proc, self.sizes = proc, []

    def __call__(self, images, **kw):  # type: ignore[no-untyped-def]
        self.sizes += [img.size for img in images]
        return self.proc(images=images, **kw)


@pytest.mark.parametrize("size", [(6, 3000), (3000, 7)])
def test_hf_long_thin_picture_is_cut_before_the_processor(size: tuple[int, int], tmp_path: Path) -> None:
    """A long, thin picture (here 500:1; an 8 × 40000 strip made the processor build 3 GB of floats)
    reaches the processor cut around its centre, and its pixels still match transformers' own path
    on the whole picture (rounding aside)."""
    from transformers import AutoImageProcessor

    folder = save_family("clip", tmp_path / "clip")
    enc = create_encoder(f"hf:{folder}").load()
    pic = photo(*size, seed=5)
    spy = enc.processor = _SpyProcessor(enc.processor)
    mine = enc._geometry([pic])[0]
    (seen,) = spy.sizes
    assert max(seen) <= 64 * min(size) + 1 and min(seen) == min(size)
    proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    ref = proc(images=[pic], return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"][0]
    ref = ref.round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
    assert mine.shape == ref.shape
    diff = np.abs(mine.astype(int) - ref.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())
