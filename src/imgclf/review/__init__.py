"""Better data: label issues (cleanlab), what to label next, embeddings and similar images (issue 17).

Part of the "explain | quantize | review" layer: it reads bundles and the feature cache, and is
used by the CLI and the served page.
"""

from imgclf.review.embed import embed_files, load_embeddings, save_embeddings
from imgclf.review.label_review import ReviewResult, ReviewSettings, review_data
from imgclf.review.rank import rank_images, select_to_label
from imgclf.review.similar import SimilarityIndex, similar_images

__all__ = [
    "ReviewResult", "ReviewSettings", "SimilarityIndex", "embed_files", "load_embeddings", "rank_images",
    "review_data", "save_embeddings", "select_to_label", "similar_images",
]
