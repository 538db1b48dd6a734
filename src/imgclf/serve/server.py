"""Start the server: check the bind address, load the bundle once, run uvicorn."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from imgclf.bundle import Model
from imgclf.errors import ConfigError
from imgclf.progress import log
from imgclf.serve.app import ServeSettings, create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    """True when `host` names only this machine (127.0.0.0/8, ::1 or localhost).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:  # a host name: loopback only if every address it resolves to is
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, *, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless `allow_remote`; warn when it is allowed.

    Raises:
        ConfigError: `host` reaches beyond this machine and `allow_remote` is False.
    """
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConfigError(
            f"--host {host} would expose the server to other machines",
            expected="a loopback address such as 127.0.0.1 (the default)",
            fix="pass --allow-remote as well if you mean it, ideally behind a reverse proxy with TLS and auth",
        )
    log(f"warning: serving on {host}: anyone who can reach this machine can send images to the model. "
        "There is no authentication or TLS; put a reverse proxy in front for anything public.")


def run_server(
    model_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    settings: ServeSettings | None = None,
) -> None:
    """Serve the bundle in `model_dir` until interrupted.

    Example:
        >>> run_server("runs/pets", port=8000)  # doctest: +SKIP
    """
    import uvicorn

    check_bind(host, allow_remote=allow_remote)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port", expected="0 to 65535")
    model = Model.load(model_dir)
    app = create_app(model, settings=settings)
    log(f"serving {model_dir} ({len(model.classes)} classes) on http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False, access_log=False)
