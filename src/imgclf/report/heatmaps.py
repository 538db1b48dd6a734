"""Grad-CAM heatmaps for the report's galleries: each image beside where the model looked.

A misclassified image gets two maps, for the class it was taken for and for its true class (is the
"wolf" read off the snow?); a correctly classified one gets one. The maps are small JPEG thumbnails
embedded like the images, and at most `MAX_IMAGES` images are explained (the misclassified first,
then the most confident correct one of each class, then the second of each, ...), so the page's size
and the report's time stay bounded whatever the class count. When no map can be made (no grad-cam,
a backbone with no known target layer) the galleries show the images alone and say why.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from PIL import Image

from imgclf.bundle import Model
from imgclf.data.pipeline import Store
from imgclf.explain import Explainer, ExplainError, explain_batch
from imgclf.progress import log
from imgclf.report import figures

METHOD = "gradcam"
MAX_IMAGES = 48  # images explained per report: 48 x (1-2) thumbnails of ~4 KB each, ~1-2 s of CPU per 10 at 224 px
HEATMAP_SIDE = 112  # px, as the image thumbnails (figures.THUMBNAIL_SIDE)


def explained_items(galleries: dict[str, Any], limit: int = MAX_IMAGES) -> list[dict[str, Any]]:
    """The gallery items to explain, most telling first: every misclassified one, then the confident
    correct ones rank by rank across classes, `limit` in all.

    Example:
        >>> g = {"top_losses": [{"position": 7}], "confident_correct": {"a": [{"position": 1}, {"position": 2}],
        ...                                                          "b": [{"position": 3}]}}
        >>> [i["position"] for i in explained_items(g, limit=3)]
        [7, 1, 3]
    """
    items = list(galleries["top_losses"])
    columns = list(galleries["confident_correct"].values())
    for rank in range(max((len(c) for c in columns), default=0)):
        items += [column[rank] for column in columns if rank < len(column)]
    return items[:limit]


def gallery_heatmaps(report: dict[str, Any], model: Model, store: Store) -> dict[tuple[int, str], str]:
    """Heatmap thumbnails (data URIs) by (position in `store`, class explained), for the galleries.

    Records what was done in `report["galleries"]["heatmaps"]` (method, layer, counts, or why none).

    Example:
        >>> uris = gallery_heatmaps(report, model, stores["test"])  # doctest: +SKIP
        >>> uris[(17, "cat")][:22]  # doctest: +SKIP
        'data:image/jpeg;base64,'
    """
    started = time.perf_counter()
    items = explained_items(report["galleries"])
    summary: dict[str, Any] = {"method": METHOD, "cap": MAX_IMAGES, "images": 0, "maps": 0, "note": None}
    report["galleries"]["heatmaps"] = summary
    if not items:
        return {}
    try:
        explainer = Explainer(model, method=METHOD)
    except ExplainError as exc:  # no grad-cam, or no known layer: the galleries go without maps
        summary["note"] = exc.what
        log(f"report: no heatmaps in the galleries: {exc.what}")
        return {}
    summary["layer"] = explainer.target.name
    pairs = [(int(item["position"]), name) for item in items
             for name in dict.fromkeys((item["predicted"], item["true"]))]  # one map when they agree
    kept, batch = store.batch(np.array(sorted({p for p, _ in pairs}), dtype=np.int64))
    row = {int(p): i for i, p in enumerate(kept)}
    pairs = [(p, name) for p, name in pairs if p in row]  # an image unreadable since prediction has none
    images = batch.cpu()[[row[p] for p, _ in pairs]].contiguous()  # the explainer's copy runs on the CPU
    try:
        found = explain_batch(explainer, images, [str(p) for p, _ in pairs],
                              targets=[model.classes.index(name) for _, name in pairs])
    except Exception as exc:  # the maps are an aid: a failure here must not cost the rest of the report
        summary["note"] = f"Grad-CAM failed ({type(exc).__name__}: {exc})"
        log(f"warning: report: no heatmaps in the galleries: {summary['note']}")
        return {}
    uris = {pair: figures.data_uri(figures.thumbnail(Image.fromarray(e.overlay), HEATMAP_SIDE))
            for pair, e in zip(pairs, found, strict=True)}
    summary.update(images=len(row), maps=len(uris), seconds=round(time.perf_counter() - started, 1))
    log(f"report: {len(uris)} Grad-CAM heatmaps of {len(row)} gallery images in {summary['seconds']} s")
    return uris
