"""Simulated devices for the gateway: models, fault injection, TCP and pty drivers.

Nobody should need hardware to see the gateway work. The models are pure
behaviour (``simulators.models``), faults a pure seeded layer
(``simulators.faults``); ``simulators.drivers`` puts them on a real TCP
connection or pseudo-terminal, and ``simulators.runner`` runs many at once.
Only ``frames`` and the standard library are imported.
"""

from .drivers import DeviceDriver, LinkEnd, PtyDevice, TcpDevice
from .faults import FaultCounters, FaultInjector, Faults, FaultSpecError, parse_faults
from .models import (
    AckStatus,
    DeviceModel,
    EnvSensorModel,
    ModelCounters,
    ModelState,
    Relay4Model,
    model_class,
)
from .runner import Simulation, SimulationStats, run_devices
from .spec import MIX, DeviceSpec, make_specs

__all__ = [
    "MIX",
    "AckStatus",
    "DeviceDriver",
    "DeviceModel",
    "DeviceSpec",
    "EnvSensorModel",
    "FaultCounters",
    "FaultInjector",
    "FaultSpecError",
    "Faults",
    "LinkEnd",
    "ModelCounters",
    "ModelState",
    "PtyDevice",
    "Relay4Model",
    "Simulation",
    "SimulationStats",
    "TcpDevice",
    "make_specs",
    "model_class",
    "parse_faults",
    "run_devices",
]
