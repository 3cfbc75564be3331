"""The JSON document of ``imgsync evaluate --json``, also the record kept per model for ``cutover``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SampleInfo", "ModelEvaluation", "AnnRecall", "EvaluationOutput"]


class SampleInfo(BaseModel):
    """The seeded, SKU-stratified sample every model was measured on."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    requested: int = Field(description="--sample: images asked for")
    images: int = Field(description="images measured (every model has a vector for each)")
    skus: int = Field(description="SKUs in the sample, each with >= 2 images")
    queries: int = Field(description="image queries: every sampled image, searched against the others")
    max_per_sku: int = Field(description="images drawn per SKU at most")
    left_out: int = Field(0, description="sampled images left out: unreadable now, or a SKU left with one image")
    key: str = Field(description="seed, size and digest of the sampled image ids: equal keys, equal samples")
    bootstrap_resamples: int


class ModelEvaluation(BaseModel):
    """One model on the sample. Search is exact (numpy, cosine), never the ANN index."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str
    spec: str
    source: Literal["version", "spec"] = Field(description="a model version of the index, or a spec encoded here")
    status: str | None = Field(None, description="the version's status (serving, standby, building)")
    recall_at_1: float = Field(description="share of queries whose nearest other image is of the same SKU")
    recall_at_1_ci: tuple[float, float] = Field(description="95% bootstrap interval of recall_at_1 (SKUs resampled)")
    recall_at_5: float = Field(description="share of queries with a same-SKU image among the 5 nearest others")
    mean_ap: float = Field(description="mean average precision of same-SKU images over the full ranking")
    silhouette: float = Field(description="mean silhouette of SKUs, cosine distance, in [-1, 1]")
    vectors_from_index: int = Field(description="vectors read from the version's collection")
    vectors_encoded: int = Field(description="vectors encoded here (specs, and images a version lacks)")
    images_per_second: float | None = Field(description="encode throughput on this device, model forward only")
    images_timed: int = Field(description="images the throughput was measured over")
    batch_size: int
    device: str
    parameters: int = Field(description="parameters of the loaded model (every tower it loads)")
    weights_bytes: int = Field(description="bytes of the loaded parameters and buffers")
    peak_memory_bytes: int | None = Field(description="see peak_memory_method")
    peak_memory_method: Literal["cuda_max_allocated", "rss_delta_sampled", "unavailable"] = Field(
        description="cuda_max_allocated: torch.cuda.max_memory_allocated over loading and encoding, less what "
        "was allocated before; rss_delta_sampled (CPU): weights_bytes plus the highest process RSS while "
        "encoding (sampled every 10 ms) above the RSS after loading"
    )
    dim: int
    index_bytes_per_million: int = Field(description="raw float32 vectors of 1e6 images: dim * 4 * 1e6 bytes")


class AnnRecall(BaseModel):
    """How much the serving collection's ANN index loses against exact search over its own vectors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str
    collection: str
    index_type: str
    k: int
    queries: int = Field(description="stored vectors used as queries (from the sample)")
    vectors_scanned: int = Field(description="vectors of the collection searched exactly")
    recall_at_k: float = Field(description="share of the exact top k that the ANN search returned (ties count)")


class EvaluationOutput(BaseModel):
    """``imgsync evaluate --json``."""

    model_config = ConfigDict(extra="forbid")

    sample: SampleInfo
    models: list[ModelEvaluation]
    ann: AnnRecall | None = None
    notes: list[str] = Field(default_factory=list)
