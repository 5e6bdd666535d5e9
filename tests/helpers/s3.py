"""A local S3 (moto's server, on 127.0.0.1) for the tests: the fixtures
``endpoint`` (the server, one per module), ``bucket`` (a bucket per test,
named after it) and ``options`` (storage options that reach it). A test that
uses ``endpoint`` is a system test (see ``conftest.SYSTEM_FIXTURES``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint, request) -> str:
    name = request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def options(endpoint) -> dict[str, Any]:
    return {**CREDENTIALS, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
