"""The served page's "why?" toggle: `POST /explain`, a Grad-CAM heatmap of the image sent.

It takes the same bodies as `/predict` (multipart files or one raw image), under the same limits
(the body-size and concurrency middleware cover both paths), and answers the PNG (image | overlay,
with the prediction as caption) or, with `format=json`, the same as base64 with the prediction.

Grad-CAM needs gradients, so the map is always computed on the bundle's PyTorch network, on the
inference thread (one pass at a time, like predictions); when the server predicts on OpenVINO or
ONNX the answer says so. Each method's `Explainer` (a private copy of the network) is built on the
first request that asks for it and kept.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any
from urllib.parse import quote

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from imgclf.bundle import Model
from imgclf.explain import METHODS, Explainer, ExplainError, Explanation, explain_batch
from imgclf.explain.images import class_index

router = APIRouter()
FORMATS = ("png", "json")


def _explainer(app_state: Any, method: str) -> Explainer:
    """The cached explainer for `method` (runs on the inference thread, so no lock is needed)."""
    cache: dict[str, Explainer] | None = getattr(app_state, "explainers", None)
    if cache is None:
        cache = app_state.explainers = {}
    if method not in cache:
        cache[method] = Explainer(app_state.model, method=method)
    return cache[method]


def _explain(
    app_state: Any, method: str, batch: torch.Tensor, names: list[str], target: int | None
) -> list[Explanation]:
    explainer = _explainer(app_state, method)
    return explain_batch(explainer, batch, names, targets=None if target is None else [target] * len(names))


def _note(runtime: str) -> str | None:
    if runtime == "torch":
        return None
    return (f"this server predicts on {runtime}, which cannot backpropagate: the heatmap was computed on the bundle's "
            "PyTorch network (its probabilities can differ from /predict's in the last digits)")


def _check(model: Model, method: str, class_name: str | None, answer: str) -> int | None:
    from imgclf.serve.app import ApiError

    if method not in METHODS:
        raise ApiError(422, f"unknown method {method!r}", expected=", ".join(METHODS))
    if answer not in FORMATS:
        raise ApiError(422, f"unknown format {answer!r}", expected="png or json")
    if class_name is None:
        return None
    try:
        return class_index(model, class_name)
    except ExplainError as exc:
        raise ApiError(422, exc.what, expected=exc.expected, fix=exc.fix) from None


@router.post(
    "/explain",
    summary="A Grad-CAM heatmap of where the model looks, as PNG (or base64 JSON)",
    description="The same bodies and limits as /predict. `method`: gradcam (default), gradcam++ or eigencam; "
    "`class`: the label to explain (default: the predicted one); `format`: png (one image) or json.",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "application/json": {}}}},
)
async def explain(request: Request, method: str = "gradcam", format: str = "png") -> Response:
    from imgclf.serve.app import ApiError, _read_images, _retry

    state = request.app.state
    if not state.predictor.ready:
        raise ApiError(503, "the model is still warming up", headers=_retry(request))
    target = _check(state.model, method, request.query_params.get("class"), format)
    started = time.perf_counter()
    items = await _read_images(request, state.settings)
    if format == "png" and len(items) > 1:
        raise ApiError(422, f"format=png answers one image; {len(items)} were sent", fix="send one, or ask format=json")
    batch = await run_in_threadpool(state.predictor.decode, items)
    names = [name for name, _ in items]
    try:
        found = await asyncio.get_running_loop().run_in_executor(
            state.predictor.executor, _explain, state, method, batch, names, target)
    except ExplainError as exc:  # e.g. a backbone with no known target layer
        raise ApiError(501, exc.what, expected=exc.expected,
                       fix="explain offline with imgclf explain BUNDLE IMAGE --layer NAME") from None
    pngs = await run_in_threadpool(lambda: [e.to_png() for e in found])
    note = _note(state.predictor.runtime)
    seconds = round((time.perf_counter() - started) * 1000, 2)
    if format == "png":
        headers = {"X-Imgclf-Predicted": quote(found[0].predicted), "X-Imgclf-Target": quote(found[0].target),
                   "X-Imgclf-Probability": f"{found[0].probability:.6f}", "X-Imgclf-Runtime": "torch",
                   "Cache-Control": "no-store"}
        return Response(pngs[0], media_type="image/png", headers=headers)
    body = {"explanations": [{**e.to_dict(), "png_base64": base64.b64encode(png).decode("ascii")}
                             for e, png in zip(found, pngs, strict=True)],
            "runtime": "torch", "note": note, "total_ms": seconds}
    return JSONResponse(body)
