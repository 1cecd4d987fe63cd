"""What one simulated device is: a small frozen description the runner and the gateway share.

``iot-gateway simulate`` and ``iot-gateway serve --demo`` both describe their
devices with ``DeviceSpec`` and turn each into a model and a fault injector
here, so the two cannot drift apart in how they seed or name things.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from frames import valid_client_id

from .faults import FaultInjector, Faults
from .models import MODELS, DeviceModel, model_class

MIX: Final = "mix"  # --protocol value: alternate the simulated protocols
PROTOCOL_CHOICES: Final = (*sorted(MODELS), MIX)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device.

    ``hello=False`` is for a pseudo-terminal device behind a gateway serial
    link configured with this client_id and protocol: it never sends HELLO.
    ``seed`` fixes its telemetry, its faults and its reconnect jitter.
    """

    client_id: str
    protocol: str = "env-sensor"
    rate: float = 1.0
    token: str = ""
    seed: int = 0
    hello: bool = True
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if not valid_client_id(self.client_id):
            raise ValueError(
                f"client_id {self.client_id!r} must be 1..64 characters of A-Za-z0-9._:-"
            )
        model_class(self.protocol)  # raises ValueError naming the known protocols
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number of DATA per second, not {self.rate}")

    def build_model(self) -> DeviceModel:
        """A fresh model for this device."""
        return model_class(self.protocol)(
            self.client_id, token=self.token, rate=self.rate, seed=self.seed, hello=self.hello
        )

    def build_injector(self) -> FaultInjector:
        """A fresh fault injector for this device, seeded apart from its model."""
        return FaultInjector(self.faults, seed=f"faults:{self.seed}")


def make_specs(
    count: int,
    *,
    protocol: str = MIX,
    rate: float = 1.0,
    token: str = "",
    seed: int = 0,
    prefix: str = "sim",
    hello: bool = True,
    faults: Faults | None = None,
) -> list[DeviceSpec]:
    """``count`` devices named ``{prefix}-1`` ... with ``protocol`` (or alternating, for "mix").

    Each device gets its own seed derived from ``seed``, so two runs with the
    same arguments send the same telemetry.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")
    if protocol != MIX:
        model_class(protocol)
    names = sorted(MODELS)
    specs: list[DeviceSpec] = []
    for i in range(count):
        proto = names[i % len(names)] if protocol == MIX else protocol
        specs.append(
            DeviceSpec(
                client_id=f"{prefix}-{i + 1}",
                protocol=proto,
                rate=rate,
                token=token,
                seed=seed * 1_000_003 + i,
                hello=hello,
                faults=faults or Faults(),
            )
        )
    return specs
