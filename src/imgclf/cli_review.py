"""The `review`, `rank`, `embed` and `similar` subcommands (registered in cli.COMMANDS)."""

from __future__ import annotations

import argparse
import json
import sys

from imgclf.config import DEFAULT_BACKBONE
from imgclf.errors import ImgclfError

# Repeated from imgclf.review so that building the parser imports neither cleanlab nor torch.
FILTER_METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
                  "low_normalized_margin", "low_self_confidence")
RANK_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def _print(text: str) -> None:
    """Print with characters the terminal cannot show escaped (paths may hold any bytes)."""
    encoding = sys.stdout.encoding or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def add_review(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("review", help="likely label errors, outliers and duplicates in DATA, with a page to decide on")
    p.add_argument("data", metavar="DATA", help="class folders, split folders or a CSV manifest")
    p.add_argument("--out", default="review", help="folder for label_issues.csv and review.html (default review)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"pretrained features (default {DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=int, help="input side in px (default: the backbone's, less for small images)")
    p.add_argument("--bundle", metavar="DIR", help="use a trained bundle's backbone for the features instead")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="average each image's features with its mirror's (default; --no-mirror halves the first "
                   "run's network time)")
    p.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold probe (default 5)")
    p.add_argument("--filter-by", choices=FILTER_METHODS, default="prune_by_noise_rate",
                   help="cleanlab's method for which images are issues")
    p.add_argument("--rank-by", choices=RANK_METHODS, default="self_confidence", help="cleanlab's label quality score")
    p.add_argument("--count", choices=["estimate", "cleanlab"], default="estimate",
                   help="flag as many as cleanlab estimates are wrong (default), or the set --filter-by finds")
    p.add_argument("--rounds", type=int, default=1,
                   help="out-of-fold rounds; each after the first trains without the labels the last one flagged")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--workers", type=int, default=0, help="decode threads (default: one per core)")
    p.set_defaults(handler=cmd_review)


def cmd_review(args: argparse.Namespace) -> int:
    from imgclf.review import ReviewSettings, review_data

    if args.folds < 2 or args.rounds < 1:
        raise ImgclfError(f"--folds must be at least 2 and --rounds at least 1, got {args.folds} and {args.rounds}")
    settings = ReviewSettings(backbone=args.backbone, image_size=args.image_size, bundle=args.bundle,
                              mirror=args.mirror, folds=args.folds, filter_by=args.filter_by, rank_by=args.rank_by,
                              count=args.count, rounds=args.rounds, workers=args.workers)
    result = review_data(args.data, out=args.out, settings=settings)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    counts = result.counts()
    _print(f"{result.data}: {result.images} images reviewed; " + ", ".join(f"{n} {k}" for k, n in counts.items())
           + f" (out-of-fold accuracy on the given labels {result.oof_accuracy:.4f})")
    for row in result.rows[:10]:
        _print(f"  {row.kind:<9} {row.score:.3f}  {row.given_label} -> {row.suggested_label}  {row.path}")
    if len(result.rows) > 10:
        print(f"  ... and {len(result.rows) - 10} more in the CSV")
    if result.unreadable:
        print(f"skipped {len(result.unreadable)} unreadable file(s) (listed above; imgclf check DATA lists them too)")
    print(f"label issues: {result.csv}")
    print(f"review page: {result.html} (mark keep/relabel/remove, export, then "
          "imgclf train DATA --exclude decisions.csv --relabel decisions.csv)")
    return 0


def add_rank(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rank", help="which unlabelled images to label next (uncertain and diverse)")
    p.add_argument("model", metavar="BUNDLE")
    p.add_argument("folder", metavar="UNLABELLED_DIR")
    p.add_argument("--n", type=int, default=100, help="how many to pick (default 100)")
    p.add_argument("--out", default="ranking.csv", help="CSV to write; the page goes next to it (.html)")
    p.add_argument("--method", choices=["margin", "entropy"], default="margin", help="uncertainty (default margin)")
    p.set_defaults(handler=cmd_rank)


def cmd_rank(args: argparse.Namespace) -> int:
    from imgclf.review import rank_images

    result = rank_images(args.model, args.folder, n=args.n, out=args.out, method=args.method)
    for row in result.rows[:10]:
        _print(f"  {row['rank']:>4}  {row['uncertainty']:.3f}  {row['guess']} ({row['probability']:.2f})  "
               f"{row['path']}")
    print(f"{len(result.rows)} of {result.images} images ranked in {result.seconds:.1f} s")
    print(f"ranking: {result.csv}\npage: {result.html}")
    return 0


def add_embed(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("embed", help="export the features of DATA or image files (.npy + .json, or .parquet)")
    p.add_argument("inputs", metavar="DATA|PATHS", nargs="+")
    p.add_argument("--out", required=True, help="FILE.npy (with FILE.json) or FILE.parquet")
    p.add_argument("--bundle", metavar="DIR", help="a trained bundle's backbone (default: a pretrained backbone)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"pretrained backbone (default {DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=int, help="input side in px for --backbone")
    p.add_argument("--mirror", action="store_true", help="average with the mirrored image's features")
    p.set_defaults(handler=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    from imgclf.review import embed_files, save_embeddings

    found = embed_files(args.inputs, bundle=args.bundle, backbone=args.backbone, image_size=args.image_size,
                        mirror=args.mirror)
    path = save_embeddings(found, args.out)
    print(f"{len(found.paths)} x {found.features.shape[1]} features ({found.meta['source']}): {path}")
    return 0


def add_similar(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("similar", help="the images most like IMAGE (cosine similarity of the bundle's features)")
    p.add_argument("model", metavar="BUNDLE")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--in", dest="within", metavar="DATA",
                   help="where to search: a folder, CSV or embeddings .npy (default: BUNDLE/index.npy, else the "
                   "training data)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(handler=cmd_similar)


def cmd_similar(args: argparse.Namespace) -> int:
    from imgclf.review import similar_images

    neighbours = similar_images(args.model, args.image, within=args.within, top_k=args.top_k)
    if args.json:
        print(json.dumps({"image": args.image, "neighbours": [n.to_dict() for n in neighbours]}))
        return 0
    for n in neighbours:
        _print(f"  {n.similarity:.4f}  {n.label or '':<12} {n.path}")
    return 0
