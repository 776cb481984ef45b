"""The task lease against kombu's real Redis transport: a renewed delivery survives kombu's own
visibility sweep, an abandoned one comes back. Fails if kombu moves or reshapes its index of
unacknowledged deliveries, or stops handing the delivery tag to the task."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from celery.app.task import Context
from celery.worker.request import Request

from synthmri.contract import QUEUE, TASK_SAMPLE_RANGE
from synthmri.jobstore import JobStore
from synthmri.localstack import RedisServer
from synthmri.settings import Settings
from worker.celery_app import app, celery_config
from worker.tasks import Lease, delivery_tag

VISIBILITY = 1.0  # seconds; the sweep below runs by hand, so only the ages of entries matter


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[kombu.Connection, JobStore]]:
    with RedisServer(tmp_path / "redis") as server:
        options = celery_config(Settings(redis_url=server.url))["broker_transport_options"]
        options = {**options, "visibility_timeout": VISIBILITY}
        with kombu.Connection(server.url, transport_options=options) as conn:
            yield conn, JobStore(redis.Redis.from_url(server.url, decode_responses=True))


def deliver_task(conn: kombu.Connection) -> tuple[Any, kombu.message.Message]:
    """Publish a sample_range task as the API does and take it as a worker does (not acknowledged)."""
    channel = conn.channel()
    with app.producer_or_acquire(kombu.Producer(channel)) as producer:
        app.send_task(TASK_SAMPLE_RANGE, args=["ab" * 8, 0, 1], queue=QUEUE, producer=producer)
    message = channel.basic_get(QUEUE)
    assert message is not None
    return channel, message


def sweep(channel: Any) -> int:
    """Run kombu's visibility sweep once; returns how many tasks are back in the queue."""
    channel.qos.restore_visible(interval=1)
    return int(channel.client.llen(QUEUE))


def test_the_task_sees_the_delivery_tag_kombu_indexes(broker: tuple[kombu.Connection, JobStore]) -> None:
    conn, store = broker
    _, message = deliver_task(conn)
    request = Request(message, app=app, task=app.tasks[TASK_SAMPLE_RANGE])
    tag = delivery_tag(Context(request.request_dict))
    assert tag == message.delivery_tag and store.renew_delivery(tag)


def test_a_renewed_delivery_survives_the_sweep_and_an_abandoned_one_returns(
    broker: tuple[kombu.Connection, JobStore],
) -> None:
    conn, store = broker
    channel, message = deliver_task(conn)
    time.sleep(VISIBILITY + 0.2)
    assert store.renew_delivery(message.delivery_tag)
    assert sweep(channel) == 0  # renewed: still leased to its worker
    time.sleep(VISIBILITY + 0.2)
    assert sweep(channel) == 1  # not renewed for a visibility timeout: handed back
    assert not store.renew_delivery(message.delivery_tag)  # nothing left to renew


def test_the_lease_renews_while_the_task_runs_and_stops_after(
    broker: tuple[kombu.Connection, JobStore],
) -> None:
    conn, store = broker
    channel, message = deliver_task(conn)
    with Lease(store, message.delivery_tag, period=VISIBILITY / 4):
        time.sleep(2 * VISIBILITY)
        assert sweep(channel) == 0
    time.sleep(VISIBILITY + 0.2)
    assert sweep(channel) == 1
