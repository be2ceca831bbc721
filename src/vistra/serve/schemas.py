"""The shapes of the API's answers and request bodies: they document it at /docs and
/openapi.json.

Uploads are read from the stream by `vistra.serve.uploads`, not parsed by FastAPI, so the
request bodies are described here as OpenAPI fragments rather than as models.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class", description="class name")
    probability: float


class HeatMap(BaseModel):
    method: str
    target: int = Field(description="index of the class explained")
    label: str | None = Field(description="name of the class explained")
    probability: float = Field(description="the model's probability for that class")
    overlay_png: str = Field(description="the image with the heat map over it, PNG in base64")


class Prediction(BaseModel):
    model: str
    classes: list[ClassProbability] = Field(description="top-k, most probable first")
    ms: float = Field(description="time in the server, from arrival to answer")
    explanation: HeatMap | None = None


class BatchItem(BaseModel):
    file: str = Field(description="the part's file name")
    model: str | None = None
    classes: list[ClassProbability] | None = None
    ms: float | None = None
    status: int = Field(200, description="HTTP status this file alone would have got")
    detail: str | None = Field(None, description="why it failed, when status is not 200")


class ModelInfo(BaseModel):
    name: str
    backend: str
    dtype: str = Field(description="what the model computes in: fp32, bf16 (torch backend) "
                       "or int8 (a quantised .onnx)")
    classes: list[str]
    input_size: list[int] = Field(description="[channels, height, width] the model sees")
    checkpoint_hash: str | None = Field(description="SHA-256 of the model file")
    max_batch: int
    max_upload_mb: float
    explain_methods: list[str] = Field(description="methods for ?explain=, empty if none")
    explain_default: str | None = Field(description="the method ?explain= (empty) or "
                                        "?explain=default uses: the one the model's card "
                                        "records as most faithful, else its family's")
    explain_unavailable: str | None = Field(description="why heat maps are off, if they are")
    explain_max_in_flight: int = Field(description="heat-map requests at once; more get 503")
    explain_timeout_s: float = Field(description="a heat-map request's time limit (504)")
    version: str


class Status(BaseModel):
    status: str


IMAGE_BODY = {  # POST /v1/predict: one image, as a multipart field or as the whole body
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
FILES_BODY = {  # POST /v1/predict/batch: multipart fields named `file`
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array",
                                "items": {"type": "string", "format": "binary"}}}}}},
}
ERRORS = {code: {"description": text, "content": {"application/json": {"example": {
    "detail": "a one-line reason"}}}} for code, text in [
    (400, "corrupt or truncated image, extreme aspect ratio, malformed request"),
    (408, "the body stopped arriving for --read-timeout-s"),
    (413, "body over --max-upload-mb, or an image over the pixel limit"),
    (415, "the upload is not an image"),
    (429, "--max-in-flight-per-client requests from this address in progress (see "
     "Retry-After)"),
    (503, "too many requests in the service, or --explain-max-in-flight heat maps (see "
     "Retry-After)"),
    (504, "not answered within --timeout-s (a heat map: --explain-timeout-s)")]}
