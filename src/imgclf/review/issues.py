"""Which labelled images look wrong: out-of-fold probabilities, then cleanlab.

1. `out_of_fold_probabilities`: the linear probe (`training.probe`, the same logistic regression as
   `train --recipe probe`) fitted k times on frozen features, each time scoring only the fold it did
   not see. No image is scored by a head that saw its label, which is what confident learning
   needs (Northcutt et al., "Confident Learning", JAIR 2021).
2. `find_label_issues`: cleanlab's `filter.find_label_issues` on those probabilities and the given
   labels, ranked by cleanlab's label quality score; the suggested label is the most probable class.
3. `find_outliers`: cleanlab's Datalab outlier check on the features (mean distance to the k nearest
   neighbours, flagged above the upper fence of their distribution).

Only the out-of-fold loop is ours: cleanlab needs probabilities and takes any model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imgclf.config import DEFAULT_PROBE_L2
from imgclf.errors import ConfigError
from imgclf.progress import log, progress
from imgclf.training.probe import fit_logistic, fit_probe

# cleanlab's `filter_by` methods (cleanlab.filter.find_label_issues) and the scores it ranks by
# (cleanlab.rank.get_label_quality_scores). Measured on CIFAR-10 with 5% and 10% flipped labels in
# BENCHMARKS.md, issue 17.
FILTER_METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
                  "low_normalized_margin", "low_self_confidence")
RANK_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
DEFAULT_FILTER = "prune_by_noise_rate"
DEFAULT_RANK = "self_confidence"
DEFAULT_FOLDS = 5


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
    l2: float | None = None, leave_out: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """(N x C probabilities, the L2 strength used): each row from a probe that did not see that image.

    The L2 strength is chosen once, on the first fold (the probe's own path over
    `config.DEFAULT_PROBE_L2`, scored on that fold's held-out images), and reused for the others.
    Folds are stratified by label; a class with fewer images than `folds` is spread over as many
    folds as it has images. `leave_out` (N booleans) marks images no head trains on (labels already
    suspected: a second round fits on cleaner labels); every image is still scored.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0).astype(np.int64)
        >>> probs, l2 = out_of_fold_probabilities(x, y, 2, folds=3)
        >>> probs.shape, bool(np.allclose(probs.sum(1), 1, atol=1e-5))
        ((60, 2), True)
    """
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(labels, minlength=num_classes)[np.bincount(labels, minlength=num_classes) > 0].min())
    splits = max(2, min(folds, smallest))
    if splits < folds:
        log(f"review: {splits} folds instead of {folds} (the smallest class has {smallest} images)")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    probabilities = np.zeros((len(labels), num_classes), dtype=np.float32)
    folder = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    bar = progress(total=splits, desc="out-of-fold probe", unit="fold")
    for fold, (seen, unseen) in enumerate(folder.split(np.zeros(len(labels)), labels)):
        if leave_out is not None:
            seen = seen[~leave_out[seen]]
        seen_t, unseen_t = torch.from_numpy(seen), torch.from_numpy(unseen)
        if l2 is None:  # the first fold's held-out images choose the strength for every fold
            chosen = fit_probe(x[seen_t], y[seen_t], x[unseen_t], y[unseen_t], num_classes, list(DEFAULT_PROBE_L2))
            l2, head = chosen.l2, chosen.head
            log(f"review: probe L2 {l2:g} (fold 1 accuracy on the given labels {chosen.val_accuracy:.4f})")
        else:
            head = fit_logistic(x[seen_t], y[seen_t], num_classes, l2=l2)
        with torch.no_grad():
            probabilities[unseen] = torch.softmax(head(x[unseen_t]), dim=1).numpy()
        bar.update(1)
        del fold
    bar.close()
    return probabilities, float(l2 if l2 is not None else 0.0)


@dataclass
class LabelIssues:
    """cleanlab's findings: `ranked` indices, most likely wrong first, and everyone's scores."""

    ranked: np.ndarray  # indices of the flagged images, most likely wrong first
    quality: np.ndarray  # N label quality scores in [0, 1] (low = likely wrong)
    suggested: np.ndarray  # N most probable classes
    estimated_count: int  # cleanlab's estimate of how many labels are wrong (num_label_issues)


def find_label_issues(
    labels: np.ndarray, probabilities: np.ndarray, *, filter_by: str = DEFAULT_FILTER, rank_by: str = DEFAULT_RANK,
    count: str = "cleanlab",
) -> LabelIssues:
    """Flag likely label errors with cleanlab.

    Args:
        labels: N given labels.
        probabilities: N x C out-of-fold probabilities.
        filter_by: cleanlab's method to decide which images are issues (`FILTER_METHODS`).
        rank_by: cleanlab's label quality score to rank them by (`RANK_METHODS`).
        count: "cleanlab" flags the set `filter_by` finds; "estimate" flags the lowest-quality
            images, as many as cleanlab's `num_label_issues` estimates are wrong.

    Example:
        >>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]])
        >>> issues = find_label_issues(np.array([0, 0, 1, 1, 1]), probs, filter_by="predicted_neq_given")
        >>> issues.ranked.tolist(), issues.suggested[4].item()
        ([4], 0)
    """
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    if filter_by not in FILTER_METHODS or rank_by not in RANK_METHODS or count not in ("cleanlab", "estimate"):
        raise ConfigError(f"unknown label-issue method: filter_by={filter_by!r}, rank_by={rank_by!r}, count={count!r}",
                          expected=f"filter_by in {FILTER_METHODS}, rank_by in {RANK_METHODS}, "
                                   "count 'cleanlab' or 'estimate'")
    quality = get_label_quality_scores(labels, probabilities, method=rank_by)
    estimated = int(num_label_issues(labels, probabilities))
    if count == "estimate":
        ranked = np.argsort(quality, kind="stable")[:estimated]
    else:
        ranked = np.asarray(cleanlab_find(labels, probabilities, filter_by=filter_by,
                                          return_indices_ranked_by=rank_by), dtype=np.int64)
    return LabelIssues(ranked=ranked, quality=np.asarray(quality, dtype=np.float64),
                       suggested=probabilities.argmax(1), estimated_count=estimated)


# Datalab's default outlier threshold on features (cleanlab OutlierIssueManager.DEFAULT_THRESHOLDS):
# flagged when the mean distance to the k nearest neighbours is above Q3 + (1 / 0.37037 - 1) * IQR.
OUTLIER_THRESHOLD = 0.37037
OUTLIER_NEIGHBOURS = 10


def find_outliers(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of outliers, most outlying first; N outlier scores in [0, 1], low = unlike the rest).

    cleanlab's `OutOfDistribution` scores the L2-normalised features (cosine geometry, as `similar`)
    by their mean distance to the k nearest neighbours; an image is flagged by Datalab's rule above
    (`OUTLIER_THRESHOLD`). Datalab itself is not called: it needs Hugging Face `datasets`, a large
    install, for what is three lines here. `labels` are not used: an outlier is unlike all images.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8)) + 10; x[7] = -x[7]  # pointing the other way
        >>> flagged, scores = find_outliers(x, np.zeros(50, int))
        >>> 7 in flagged.tolist()
        True
    """
    from cleanlab.outlier import OutOfDistribution
    from scipy.stats import iqr

    del labels
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    k = max(1, min(OUTLIER_NEIGHBOURS, len(x) - 1))
    scores = OutOfDistribution({"k": k}).fit_score(features=x.astype(np.float32), verbose=False)
    # The scores are exp(-distance / scale), so the fence on -log(score) is the fence on the distances.
    distance = -np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-300))
    fence = np.percentile(distance, 75) + (1 / OUTLIER_THRESHOLD - 1) * iqr(distance)
    flagged = np.flatnonzero(distance > fence)
    return flagged[np.argsort(scores[flagged], kind="stable")], np.asarray(scores, dtype=np.float64)
