"""Request and response shapes (pydantic), so /docs is generated and every request is checked alike."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ImageInput(BaseModel):
    """One image: the file's bytes, base64-encoded, or a ``data:image/...;base64,`` URL. No http(s) URLs."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 of a JPEG/PNG/WebP/GIF/BMP/TIFF file, or a data: URL")


InputItem = Union[str, ImageInput, int, list[int]]


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, with images as ``{"image": ...}`` items (or ``modality: "image"``)."""

    model: str = Field(description="a served model's name (GET /v1/models)")
    input: Union[str, ImageInput, list[InputItem]] = Field(
        description="a string, an image item, or a list mixing both; token ids are refused"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64': little-endian float32 bytes, base64-encoded (the openai client's default)"
    )
    dimensions: Optional[int] = Field(None, description="must equal the model's dimension if given")
    modality: Optional[Literal["text", "image"]] = Field(
        None, description="'image': every string in input is a base64 image or data: URL (infinity's convention)"
    )
    user: Optional[str] = Field(None, description="accepted and ignored, as OpenAI's API defines it")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image against a set of labels."""

    model: str = Field(description="a served model's name")
    image: str = Field(description="base64 of the image file, or a data: URL")
    labels: list[str] = Field(min_length=1, description="the candidate labels")
    template: Optional[str] = Field(
        None, description="a prompt with '{}' where the label goes, e.g. 'a photo of a {}.'; default: the label alone"
    )


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    object: Literal["classification"] = "classification"
    model: str
    label: str = Field(description="the label with the highest score")
    data: list[LabelScore] = Field(description="every label with its probability, in the order given")
    usage: Usage
