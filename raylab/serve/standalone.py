"""`raylab api CONFIG --standalone`: the fine-tuning service's routes alone, on their own port
(uvicorn), rather than in the inference endpoint's ingress (`api.enabled` + `raylab serve`).

    from raylab.serve import run_api
    run_api(cfg, standalone=True, port=8100)        # blocks; http://127.0.0.1:8100/v1
    app = standalone_app(cfg, db_url)               # the FastAPI app (tests run it in TestClient)
"""

from __future__ import annotations

import logging

from raylab.core import controldb
from raylab.errors import UserError
from raylab.serve.app import create_app
from raylab.serve.finetune import FineTuning
from raylab.serve.routers import files, fine_tuning, release

log = logging.getLogger(__name__)


class Standalone:
    """What the routes reach in `raylab api --standalone`: the service, with no ingress."""

    def __init__(self, service: FineTuning):
        self.ftapi = service


def standalone_app(cfg, db_url: str | None = None):
    """The fine-tuning routes alone in a FastAPI app (errors OpenAI-shaped, as in the ingress)."""
    return create_app([files.router, fine_tuning.router, release.router], Standalone(FineTuning(cfg, db_url)))


def run_api(cfg, standalone: bool = False, host: str | None = None, port: int | None = None) -> int:
    """`raylab api CONFIG --standalone`: serve the fine-tuning routes on api.host:api.port with
    uvicorn until interrupted. Without --standalone the service lives in the inference
    endpoint's ingress (one base URL): `api.enabled: true` and `raylab serve CONFIG`."""
    if not standalone:
        raise UserError("raylab api: the service runs inside `raylab serve`'s ingress when api.enabled is true (one "
                        "base URL with inference); pass --standalone to run it alone on api.host:api.port")
    import uvicorn

    app = standalone_app(cfg)
    host, port = host or cfg.api.host, port or cfg.api.port
    log.info(f"raylab api: the fine-tuning service on http://{host}:{port}/v1 (database {controldb.describe(app.state.ingress.ftapi.db)})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
