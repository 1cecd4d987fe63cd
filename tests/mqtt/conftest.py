"""Module-scoped private Mosquitto for tests/mqtt (never the shared broker on 1883)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import Mosquitto


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()
