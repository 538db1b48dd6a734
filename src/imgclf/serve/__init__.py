"""Serve a bundle over HTTP: the FastAPI app (`create_app`) and the runner (`run_server`)."""

from imgclf.serve.app import ServeSettings, create_app
from imgclf.serve.server import run_server

__all__ = ["ServeSettings", "create_app", "run_server"]
