"""Simulated devices for the gateway: models, fault injection, TCP and pty drivers.

Nobody should need hardware to see the gateway work. The models are pure
behaviour (``simulators.models``), faults a pure seeded layer
(``simulators.faults``), and the device end of the handshake one sans-IO
helper (``simulators.handshake``, shared with the load generator and the
tests); ``simulators.drivers`` puts them on a real TCP connection or
pseudo-terminal, and ``simulators.runner`` runs many at once.
Only ``frames`` and the standard library are imported.
"""

from .drivers import DeviceDriver, LinkEnd, PtyDevice, TcpDevice, TlsClient, TlsSetupError
from .faults import FaultCounters, FaultInjector, Faults, FaultSpecError, parse_faults
from .handshake import DeviceHandshake, MessageReader, Phase, error_name, is_fatal
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
    "DeviceHandshake",
    "DeviceModel",
    "DeviceSpec",
    "EnvSensorModel",
    "FaultCounters",
    "FaultInjector",
    "FaultSpecError",
    "Faults",
    "LinkEnd",
    "MessageReader",
    "ModelCounters",
    "ModelState",
    "Phase",
    "PtyDevice",
    "Relay4Model",
    "Simulation",
    "SimulationStats",
    "TcpDevice",
    "TlsClient",
    "TlsSetupError",
    "error_name",
    "is_fatal",
    "make_specs",
    "model_class",
    "parse_faults",
    "run_devices",
]
