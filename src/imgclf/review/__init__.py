"""Better data: label issues (cleanlab), what to label next, embeddings and similar images (issue 17)."""
