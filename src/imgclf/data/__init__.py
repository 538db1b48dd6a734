"""Data: find, decode and batch images. The layer above errors/config/files, below models.

Inside it, imports point one way: `dataset` (the shared types) and `decode` -> `cifar` ->
`layout` (what a DATA argument is) -> `sources` (its files and labels) -> `scan` (one file) ->
`scan_cache` -> `check` (whole datasets, and the pre-flight scan); `pipeline` decodes and batches.
"""
