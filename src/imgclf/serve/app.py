"""The HTTP API and web page for one loaded model (FastAPI).

The app is built around a `Model` that is already loaded: no endpoint loads a model, reads a
path from the request or fetches a URL. Images are decoded by `imgclf.data.decode.open_image`,
the decoder used in training, and inference runs on one worker thread (the runtimes already use
every core), so the event loop stays free to answer `/health` and refuse overload quickly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from imgclf.bundle import Model
from imgclf.data.decode import UnreadableImageError, open_image
from imgclf.data.pipeline import image_to_tensor
from imgclf.progress import log
from imgclf.serve.batching import MicroBatcher
from imgclf.serve.explain import router as explain_router
from imgclf.serve.limits import BodySizeLimit, ConcurrencyLimit, Gate
from imgclf.serve.similar import attach_similar
from imgclf.serve.similar import router as similar_router

STATIC = Path(__file__).parent / "static"
RAW_TYPES = ("image/", "application/octet-stream")
# The page loads only its own files; uploaded previews are blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and options of the server. Defaults suit one model on a small CPU box."""

    runtime: str = "auto"  # auto, torch, onnx or openvino (see runtime.FrozenForward)
    top_k: int = 5
    max_body_bytes: int = 16 * 2**20  # per request, all files together; 16 MiB fits a large phone photo
    max_files: int = 32  # images per multipart request
    max_concurrency: int = 64  # requests decoding, queued or predicting; more get 503 at once
    retry_after_s: int = 1  # the Retry-After sent with 503
    max_batch: int = 64  # images per forward pass when queued requests are merged (micro-batching)
    threshold: float | None = None  # multi-label: one threshold for every label instead of the bundle's


class ApiError(HTTPException):
    """An HTTP error answered as JSON: {"error", "status", "expected"?, "fix"?}."""

    def __init__(self, status: int, error: str, *, expected: str | None = None, fix: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=error, headers=headers)
        self.expected = expected
        self.fix = fix


class Predictor:
    """Decodes request images and runs the model on its single inference thread."""

    def __init__(self, model: Model, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        self.batcher = MicroBatcher(self.predict, self.executor, max_images=settings.max_batch)
        self.ready = False
        self.runtime = settings.runtime

    def warm_up(self) -> None:
        """Build the runtime and run one prediction; `/ready` turns true afterwards."""
        forward = self.model.forward_function(self.settings.runtime)
        self.runtime = forward.runtime
        size = self.model.preprocessing.image_size
        self.model.probabilities(torch.zeros(1, 3, size, size, dtype=torch.uint8), runtime=self.settings.runtime)
        self.ready = True

    def decode(self, items: list[tuple[str, bytes]]) -> torch.Tensor:
        prep = self.model.preprocessing
        tensors = []
        for name, data in items:
            if not data:
                raise ApiError(422, f"{name}: empty image (0 bytes)", expected="the bytes of a JPEG, PNG, ... image")
            try:
                img = open_image(data, draft_size=prep.image_size)
            except UnreadableImageError as exc:
                unsupported = exc.reason.startswith("not an image")
                raise ApiError(
                    415 if unsupported else 422, f"{name}: {exc.reason}",
                    expected="a JPEG, PNG, BMP, GIF, WebP or TIFF image",
                ) from None
            tensors.append(image_to_tensor(img, prep.image_size, prep.interpolation))
        return torch.stack(tensors)

    def predict(self, batch: torch.Tensor) -> np.ndarray:
        return self.model.probabilities(batch, runtime=self.settings.runtime).numpy()

    def top(self, row: np.ndarray) -> list[dict[str, Any]]:
        return [{"label": label, "probability": p} for label, p in self.model.top_classes(row, self.settings.top_k)]

    def answer(self, name: str, row: np.ndarray) -> dict[str, Any]:
        """One image's prediction; a multi-label model adds `labels`, every label over its threshold."""
        top = self.top(row)
        if not self.model.multilabel:
            return {"source": name, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}
        over = self.model.labels_over(row, self.settings.threshold)
        found = [{"label": label, "probability": p} for label, p in over]
        return {"source": name, "label": found[0]["label"] if found else None,
                "probability": found[0]["probability"] if found else None, "labels": found, "top_k": top}


def create_app(model: Model, *, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `model`: the API, the OpenAPI docs at /docs and the page at /.

    The routes (`router`, below) read the model, its predictor, the gate and the settings from
    `app.state`, so one module-level router serves any app.

    Example:
        >>> app = create_app(imgclf.load("runs/pets"), settings=ServeSettings(runtime="onnx"))  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    settings = settings or ServeSettings()
    predictor = Predictor(model, settings)
    gate = Gate(settings.max_concurrency)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Warm up on the inference thread without blocking startup: /health answers at once,
        # /ready and /predict wait for it.
        warm = asyncio.get_running_loop().run_in_executor(predictor.executor, predictor.warm_up)
        warm.add_done_callback(_report_warm_up_failure)
        app.state.warm_up = warm
        try:
            yield
        finally:
            predictor.executor.shutdown(wait=False, cancel_futures=True)

    info = model.info
    app = FastAPI(
        title="imgclf",
        summary=f"Image classifier: {info.backbone.name}, {len(model.classes)} classes",
        version=info.versions.get("imgclf", ""),
        lifespan=lifespan,
    )
    app.state.model = model
    app.state.predictor = predictor
    app.state.gate = gate
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: overload is refused before anything else is looked at.
    app.add_middleware(ConcurrencyLimit, gate=gate, paths={"/predict", "/explain"},
                       retry_after_s=settings.retry_after_s)
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(explain_router)  # POST /explain: the page's "why?" heatmap
    attach_similar(app, model)  # the "similar images" panel, where the bundle has an index
    app.include_router(similar_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    body: dict[str, Any] = {"error": str(exc.detail), "status": exc.status_code}
    for field in ("expected", "fix"):
        if getattr(exc, field, None):
            body[field] = getattr(exc, field)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "invalid request", "status": 422, "detail": exc.errors()}, status_code=422)


def _retry(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_s)}


router = APIRouter()


@router.get("/health", summary="Liveness: the process answers")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "in_flight": request.app.state.gate.in_flight}


@router.get("/ready", summary="Readiness: true only after the warm-up prediction")
async def ready(request: Request) -> JSONResponse:
    predictor: Predictor = request.app.state.predictor
    if predictor.ready:
        return JSONResponse({"ready": True, "runtime": predictor.runtime})
    return JSONResponse({"ready": False}, status_code=503, headers=_retry(request))


@router.get("/labels", summary="The class names, in output order")
async def labels(request: Request) -> dict[str, list[str]]:
    return {"labels": request.app.state.model.classes}


@router.get("/metadata", summary="Backbone, preprocessing, metrics and limits")
async def metadata(request: Request) -> dict[str, Any]:
    model: Model = request.app.state.model
    predictor: Predictor = request.app.state.predictor
    info = model.info
    return {
        "backbone": info.backbone.name,
        "recipe": info.recipe,
        "num_classes": len(model.classes),
        "preprocessing": model.preprocessing.to_dict(),
        "temperature": model.temperature,
        "task": info.task,
        **({"thresholds": dict(zip(model.classes, model.thresholds(predictor.settings.threshold).tolist(),
                                   strict=True))} if model.multilabel else {}),
        "metrics": {split: {k: v for k, v in values.items() if isinstance(v, (int, float))}
                    for split, values in info.metrics.items()},
        "created": info.created,
        "versions": info.versions,
        "runtime": predictor.runtime,
        "limits": asdict(request.app.state.settings),
        "micro_batching": {"forward_passes": predictor.batcher.batches_run,
                           "requests": predictor.batcher.requests_run},
    }


@router.post(
    "/predict",
    summary="Top-k labels for one or more images",
    description="Send images as multipart/form-data (any field name, one or more files) or one "
    "image as the raw body (Content-Type image/* or application/octet-stream). `model_ms` is the time "
    "from decoded images to probabilities, including any wait for the model; `total_ms` adds reading "
    "and decoding the body.",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }}},
)
async def predict(request: Request) -> dict[str, Any]:
    predictor: Predictor = request.app.state.predictor
    if not predictor.ready:
        raise ApiError(503, "the model is still warming up", headers=_retry(request))
    started = time.perf_counter()
    items = await _read_images(request, request.app.state.settings)
    batch = await run_in_threadpool(predictor.decode, items)
    model_started = time.perf_counter()
    probs = await predictor.batcher.submit(batch)
    done = time.perf_counter()
    predictions = [predictor.answer(name, row) for (name, _), row in zip(items, probs, strict=True)]
    return {
        "predictions": predictions,
        "runtime": predictor.runtime,
        "model_ms": round((done - model_started) * 1000, 2),
        "total_ms": round((done - started) * 1000, 2),
    }


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def _report_warm_up_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log(f"error: warm-up failed, the server will never be ready: {future.exception()!r}")


async def _read_images(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) for each image of a multipart or raw-body request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    expected = "multipart/form-data with image files, or an image/* (or application/octet-stream) body"
    if content_type == "multipart/form-data":
        form = await request.form(max_files=settings.max_files, max_fields=settings.max_files)
        try:
            items = []
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    items.append((value.filename or "upload", await value.read()))
        finally:
            await form.close()
        if not items:
            raise ApiError(422, "the multipart body holds no files", expected=expected)
        return items
    if content_type.startswith(RAW_TYPES):
        return [("body", await request.body())]
    raise ApiError(415, f"unsupported Content-Type {content_type or '(none)'!r}", expected=expected)
