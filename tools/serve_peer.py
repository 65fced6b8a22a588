"""The PyTorch peer of tools/bench_serve.py: a plain FastAPI + open_clip server, written the way a user would.

    python tools/serve_peer.py --model ViT-B-32 [--pretrained TAG | --checkpoint FILE | --seed N]
        [--model-config ARCH.json] [--port 8090]

Not part of clipdeploy: it is what a user would write instead of `clipdeploy serve`, and it is ours.
One request is one forward pass under ``torch.inference_mode()``; no batching, torch's default
threads, FastAPI's default thread pool for the (sync) route. It takes the same request shape as
`clipdeploy serve` for one item, so the benchmark's clients send both the same bytes:

    POST /v1/embeddings {"input": "a photo of a cat"} or {"input": {"image": "<base64 JPEG>"}}
      -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}]}
    GET /health -> {"status": "ok"} once the model is loaded

Weights: ``--pretrained TAG`` or ``--checkpoint FILE`` as open_clip takes them (``pretrained=``), or
random weights after ``torch.manual_seed(--seed)``, the way `clipdeploy export` makes them.
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Optional, Union

import open_clip
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from PIL import Image
from pydantic import BaseModel


class ImageItem(BaseModel):
    image: str


class EmbeddingsRequest(BaseModel):
    input: Union[str, ImageItem]
    model: Optional[str] = None


def build_app(model: torch.nn.Module, preprocess: object, tokenizer: object) -> FastAPI:
    app = FastAPI(title="open_clip peer")

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingsRequest) -> dict:
        with torch.inference_mode():
            if isinstance(req.input, str):
                emb = model.encode_text(tokenizer([req.input]))
            else:
                try:
                    image = Image.open(io.BytesIO(base64.b64decode(req.input.image))).convert("RGB")
                except Exception as e:
                    raise HTTPException(400, f"not an image: {e}") from e
                emb = model.encode_image(preprocess(image).unsqueeze(0))
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": emb[0].tolist()}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="open_clip architecture name")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", help="open_clip pretrained tag")
    weights.add_argument("--checkpoint", help="a state_dict file")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building (random weights)")
    ap.add_argument("--model-config", help="open_clip architecture JSON named after --model (custom architectures)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    args = ap.parse_args()
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=args.pretrained or args.checkpoint
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    uvicorn.run(build_app(model, preprocess, tokenizer), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
