"""The SynthMRI HTTP API (FastAPI). Torch-free: jobs go to the GPU workers through Celery by name.

Run: `uvicorn api.main:app` (settings from SYNTHMRI_* environment variables).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api import openapi, problems
from api.deps import ModelsView, Services
from api.limits import RejectLargeBodies
from api.queue import TaskQueue
from api.routers import health, jobs, models
from api.state_changes import StateChanges
from api.store import AsyncJobStore, FaultView
from synthmri import __version__
from synthmri.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # Submissions hand the broker publish to a thread and back: with the interpreter's default
    # 5 ms GIL switch interval that handoff alone sets the tail latency under load.
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=settings.log_level.upper())
    store = AsyncJobStore.from_settings(settings)
    changes = StateChanges(settings.redis_url, connect_timeout=settings.redis_timeout_seconds)
    services = Services(settings, store, TaskQueue(settings), FaultView(store), ModelsView(settings), changes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.models.scan()
        await run_in_threadpool(services.queue.warm_up)
        await changes.start()
        yield
        await changes.stop()
        await services.store.close()

    app = FastAPI(
        title="SynthMRI",
        version=__version__,
        description="On-demand synthetic brain MRI slices (BraTS channels + tumour mask) from a "
        "diffusion model. Authenticate with `Authorization: Bearer KEY`; errors are problem+json.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(RejectLargeBodies, max_bytes=settings.max_request_bytes)
    problems.install(app)
    openapi.install(app, settings, lambda: services.models.latest.without_faults(services.faults.faults))
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(health.router)

    @app.get("/", include_in_schema=False, response_model=None)
    def index() -> FileResponse:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise problems.Problem(404, "the web page is not installed (api/static/index.html); see /docs")
        return FileResponse(page, media_type="text/html")

    # check_dir=False: the page's files may be absent (an API-only install); /static/* is then 404.
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


app = create_app()
