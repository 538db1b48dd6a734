"""The served page's "similar images" panel: `POST /similar`, where the bundle has an index.

A bundle has an index when `BUNDLE/index.npy` (+ `index.json`) is there, made by
`imgclf embed DATA --bundle BUNDLE --out BUNDLE/index.npy` (`imgclf.review.embed`). The index is
loaded once at start; a request sends one image (as `/predict` does) and gets the most similar
indexed images, each with its label, cosine similarity and a small thumbnail (a `data:` URI).
The paths come from the index, never from the request: no endpoint reads a path it is sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from imgclf.bundle import Model
from imgclf.data.pipeline import normalize
from imgclf.errors import ImgclfError
from imgclf.progress import log
from imgclf.review.embed import INDEX_FILE, load_embeddings
from imgclf.review.page import thumbnail
from imgclf.review.similar import SimilarityIndex, check_same_network

MAX_TOP_K = 24  # thumbnails per answer: each is ~3 KB

router = APIRouter()


def attach_similar(app: FastAPI, model: Model) -> None:
    """Load the bundle's index into `app.state.similar` (None when it has none, or it does not fit).

    Example:
        >>> attach_similar(app, imgclf.load("runs/pets"))  # doctest: +SKIP
    """
    app.state.similar = None
    folder = getattr(model, "folder", None)
    file = Path(folder) / INDEX_FILE if folder is not None else None
    if file is None or not file.is_file():
        return
    try:
        found = load_embeddings(file)
        check_same_network(found, model, str(file))
    except ImgclfError as exc:  # a stale index must not stop the server: the panel stays hidden
        log(f"warning: the similar-images index is not used: {exc}")
        return
    app.state.similar = SimilarityIndex(found.features, found.paths, labels=found.labels)
    log(f"serve: similar images from {len(found.paths)} indexed images ({file})")


def _embed(model: Model, batch: torch.Tensor) -> np.ndarray:
    """The backbone's features of a decoded uint8 batch (1 x 3 x S x S, the bundle's preprocessing)."""
    with torch.inference_mode():
        return model.module.backbone(normalize(batch, model.preprocessing)).float().numpy()[0]


@router.get("/similar", summary="Whether this bundle has a similar-images index, and its size")
async def similar_available(request: Request) -> dict[str, Any]:
    index: SimilarityIndex | None = request.app.state.similar
    return {"available": index is not None, "images": len(index.paths) if index is not None else 0}


@router.post("/similar", summary="The indexed images most like the image sent (raw body or multipart)")
async def similar(request: Request, top_k: int = 8) -> dict[str, Any]:
    from imgclf.serve.app import ApiError, _read_images

    index: SimilarityIndex | None = request.app.state.similar
    if index is None:
        raise ApiError(404, "this bundle has no similar-images index",
                       fix="imgclf embed DATA --bundle BUNDLE --out BUNDLE/index.npy, then serve again")
    items = await _read_images(request, request.app.state.settings)
    predictor = request.app.state.predictor
    batch = await run_in_threadpool(predictor.decode, items[:1])  # the first image; errors as /predict's
    loop = asyncio.get_running_loop()  # the network runs on the inference thread, one pass at a time
    query = await loop.run_in_executor(predictor.executor, _embed, request.app.state.model, batch)
    found = index.search(query, max(1, min(top_k, MAX_TOP_K)))
    labels = dict(zip(index.paths, index.labels, strict=True)) if index.labels else {}
    pictures = await loop.run_in_executor(None, lambda: [thumbnail(p) for p, _ in found])
    return {"neighbours": [{"name": Path(p).name, "label": labels.get(p), "similarity": round(s, 4),
                            "thumbnail": t} for (p, s), t in zip(found, pictures, strict=True)]}
