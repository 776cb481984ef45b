"""Dependencies shared by the routers: settings, the job store, the task queue and the caller's key.

They are `async def` because they do no blocking work: FastAPI runs a plain `def`
dependency in its thread pool, which a stalled Redis elsewhere could fill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from api.queue import TaskQueue
from api.state_changes import StateChanges
from api.store import AsyncJobStore, FaultView
from synthmri.registry import Registry, scan_registry
from synthmri.settings import Settings, hash_api_key


class ModelsView:
    """Scans of the models directory, run in a thread (a new checkpoint is hashed and
    verified on first sight, which takes a while); the last one is kept for readers on
    the event loop (the OpenAPI document)."""

    def __init__(self, settings: Settings, max_age: float = 1.0) -> None:
        self.settings = settings
        self.latest = Registry({}, {})
        self.max_age = max_age
        self.scanned_at: float | None = None

    async def scan(self) -> Registry:
        started = time.monotonic()
        self.latest = await run_in_threadpool(scan_registry, self.settings.models_dir)
        self.scanned_at = started
        return self.latest

    async def recent(self) -> Registry:
        """The last scan if it began less than `max_age` seconds ago, else a new one.

        Submissions use this: under load, a thread hop per request costs more than the scan.
        A checkpoint replaced within that second may still be named by its old sha256, and
        the worker then refuses the job as replaced after submission (the client resubmits).
        """
        if self.scanned_at is not None and time.monotonic() - self.scanned_at < self.max_age:
            return self.latest
        return await self.scan()


@dataclass
class Services:
    settings: Settings
    store: AsyncJobStore
    queue: TaskQueue
    faults: FaultView
    models: ModelsView
    changes: StateChanges


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="An API key from SYNTHMRI_API_KEYS")


async def get_owner(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The sha256 of the caller's API key (the owner id of the jobs it creates)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise Problem(401, "send your API key as `Authorization: Bearer KEY`", headers=challenge)
    if not services.settings.api_keys:
        raise Problem(
            401, "this server has no API keys configured (set SYNTHMRI_API_KEYS)", headers=challenge
        )
    owner = hash_api_key(credentials.credentials)
    if owner not in services.settings.api_keys:
        raise Problem(401, "the API key is not recognised; check it or ask for a new one", headers=challenge)
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]
