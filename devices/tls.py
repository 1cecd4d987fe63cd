"""TLS for the gateway's listeners: contexts, revocation, and a handshaking door (docs/tls.md).

A listener's protocol factory is wrapped by ``TlsDoor.wrap``: each accepted
connection first meets a small protocol that runs the TLS handshake
(``loop.start_tls``, which asyncio and uvloop both implement) with a timeout,
and only once it succeeded, and the client certificate is not revoked, makes
the listener's own protocol and hands it the TLS transport. So the device
port and the HTTP port keep their plain protocols, a handshake that fails is
counted by reason (``TlsDoor.failures``), and the HELLO timeout starts after
the handshake (docs/protocol.md §4).

Why not ``create_server(ssl=...)``: the loop then handshakes out of sight,
and a failed or timed-out handshake is logged in debug mode only, never
reported: it could not be counted.

A reload (SIGHUP) swaps the door's context and deny-list: connections open
under the old ones stay, new ones get the new.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 10.0  # seconds (docs/protocol.md §9)

# The reasons of iot_tls_handshake_failures_total, in the order docs/tls.md lists them.
REASONS: Final = (
    "timeout",  # not finished within the handshake timeout
    "not_tls",  # plain bytes (an HTTP request, a device frame) on a TLS port
    "no_certificate",  # the device port needs a client certificate and none came
    "unknown_ca",  # a client certificate not signed by the device CA
    "expired",  # a client certificate out of its validity dates
    "revoked",  # a client certificate in the CRL or the deny-list
    "bad_certificate",  # any other certificate problem
    "closed",  # the peer went away before the handshake finished
    "protocol",  # any other TLS error (no common version or cipher, a bad record...)
)

# OpenSSL's X509_V_ERR_* codes that have a reason of their own.
_VERIFY_REASONS: Final = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "expired",  # not yet valid
    10: "expired",  # has expired
    18: "unknown_ca",  # self-signed
    19: "unknown_ca",  # self-signed in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    23: "revoked",
}

_NOT_TLS: Final = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNKNOWN_PROTOCOL",
}
_NO_CERTIFICATE: Final = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"}


class TlsConfigError(ValueError):
    """A certificate, key, CA, CRL or deny-list cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files of one TLS listener (paths as configured).

    ``client_ca``, ``crl`` and ``deny_list`` apply to the device port only:
    browsers need no client certificate (docs/protocol.md §9).
    """

    cert: str
    key: str
    client_ca: str | None = None
    crl: str | None = None
    deny_list: str | None = None


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of a handshake that raised ``exc`` (one of ``REASONS``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "")
        if reason in _NOT_TLS:
            return "not_tls"
        if reason in _NO_CERTIFICATE:
            return "no_certificate"
        if reason.startswith("CERTIFICATE_VERIFY_FAILED"):  # pragma: no cover - subclass above
            return "bad_certificate"
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "closed"
        return "protocol"
    # asyncio's SSLProtocol gives up with ConnectionAbortedError at the timeout;
    # uvloop's and wait_for's with TimeoutError.
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError | OSError):
        return "closed"
    return "protocol"


def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint: 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


_FINGERPRINT: Final = re.compile(r"[0-9a-f]{64}")


def parse_deny_list(text: str, source: str) -> frozenset[str]:
    """Fingerprints, one a line: SHA-256 in hex, colons optional (``openssl x509
    -fingerprint -sha256`` prints them so), ``sha256 Fingerprint=`` prefix too;
    ``#`` starts a comment."""
    out = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        value = entry.rsplit("=", 1)[-1].replace(":", "").strip().lower()
        if not _FINGERPRINT.fullmatch(value):
            raise TlsConfigError(
                f"deny-list {source} line {number}: {entry!r} is not a SHA-256 fingerprint "
                "(64 hex digits, colons allowed)"
            )
        out.add(value)
    return frozenset(out)


def _read(path: str, what: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise TlsConfigError(f"{what} {path} does not exist or is not a file")
    try:
        p.open("rb").close()
    except OSError as e:
        raise TlsConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def load_deny_list(path: str | None) -> frozenset[str]:
    """The fingerprints of ``path`` (empty without one)."""
    if path is None:
        return frozenset()
    _read(path, "deny-list")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TlsConfigError(f"cannot read deny-list {path}: {e}") from None
    return parse_deny_list(text, path)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for ``files``: TLS 1.2 or newer, and, with ``client_ca``, client
    certificates required (checked against the CRL too when there is one)."""
    _read(files.cert, "certificate")
    _read(files.key, "private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        raise TlsConfigError(
            f"certificate {files.cert} and key {files.key} cannot be used together "
            f"(not PEM, or the key does not match the certificate): {e.reason or e}"
        ) from None
    except OSError as e:
        raise TlsConfigError(f"cannot load certificate {files.cert}: {e.strerror or e}") from None
    if files.client_ca is not None:
        _read(files.client_ca, "device CA")
        try:
            ctx.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as e:
            raise TlsConfigError(
                f"device CA {files.client_ca} is not a PEM certificate: {e}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if files.crl is not None:
            _read(files.crl, "CRL")
            try:
                ctx.load_verify_locations(cafile=files.crl)
            except (ssl.SSLError, OSError) as e:
                raise TlsConfigError(f"CRL {files.crl} is not a PEM CRL: {e}") from None
            # The leaf only: the device CA signs the CRL, and has none above it to check.
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def subject_cn(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject's commonName of ``getpeercert()``'s dict (the last one if several)."""
    if not peercert:
        return None
    cn = None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = str(value)
    return cn


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclass(slots=True)
class TlsDoor:
    """The TLS handshake in front of one listener, and its failures by reason.

    ``port`` names the listener in ``/metrics`` (``devices`` or ``http``).
    """

    port: str
    context: ssl.SSLContext
    deny_list: frozenset[str] = frozenset()
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    failures: dict[str, int] = field(default_factory=dict)
    handshakes: int = 0  # completed (and not revoked)
    # The connections whose handshake is in progress (what ``abort_handshakes`` ends).
    pending: set[_Handshake] = field(default_factory=set)
    # The listener's say, by the peer's address: ``admit`` before a handshake (False:
    # closed at once, no handshake paid for), ``on_failure`` after a failed one.
    admit: Callable[[str], bool] | None = None
    on_failure: Callable[[str], None] | None = None

    @property
    def handshaking(self) -> int:
        """Handshakes in progress now."""
        return len(self.pending)

    def abort_handshakes(self) -> None:
        """Close every connection still in its handshake (the listener is closing):
        they would otherwise hold a shutdown for up to the handshake timeout."""
        for handshake in list(self.pending):
            handshake.abort()

    def failed(self, reason: str, peer: str, detail: object, host: str = "") -> None:
        """Count one failed handshake (of ``peer``, from address ``host``)."""
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if self.on_failure is not None and host:
            self.on_failure(host)
        log.debug(
            "TLS handshake on the %s port from %s failed (%s): %s", self.port, peer, reason, detail
        )

    def reload(self, context: ssl.SSLContext, deny_list: Iterable[str] = ()) -> None:
        """New connections get ``context`` and ``deny_list``; open ones keep theirs."""
        self.context = context
        self.deny_list = frozenset(deny_list)

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        """A protocol factory that handshakes, then hands the TLS transport to ``factory()``."""
        return lambda: _Handshake(self, factory)


class _Handshake(asyncio.Protocol):
    """One connection until its handshake ends; then the listener's protocol takes over.

    It is also the TLS transport's first protocol: application data that
    arrives with the end of the handshake is kept and passed on.
    """

    def __init__(self, door: TlsDoor, factory: ProtocolFactory) -> None:
        self.door = door
        self.factory = factory
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.host = ""
        self.pending: list[bytes] = []
        self.early: list[bytes] = []
        self.tls_started = False
        self.eof = False
        self.lost = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer: Any = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host = str(peer[0]) if isinstance(peer, tuple) else self.peer
        admit = self.door.admit
        if admit is not None and not admit(self.host):
            self.transport.abort()  # type: ignore[union-attr]  # no handshake for an address held back
            return
        # asyncio reads nothing more until start_tls has put the TLS layer in place;
        # uvloop starts reading only after connection_made, so the first bytes of the
        # ClientHello may still come here: they are kept and given to the TLS layer.
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.door.pending.add(self)
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._handshake())
        # Runs just after the task's first step, in which start_tls installed its
        # protocol and scheduled that protocol's connection_made and the resumed
        # reading: one call_soon more and the early bytes come after both, and
        # before anything read from the socket again (call_soon is FIFO).
        loop.call_soon(loop.call_soon, self._replay_early)

    def _replay_early(self) -> None:
        raw = self.transport
        early, self.early = self.early, []
        if not early or raw is None or self.lost or raw.is_closing():
            return
        layer = raw.get_protocol()
        if layer is self:  # pragma: no cover - start_tls did not run: nothing to give them to
            return
        for chunk in early:
            _feed(layer, chunk)

    async def _handshake(self) -> None:
        door = self.door
        raw = self.transport
        assert raw is not None
        loop = asyncio.get_running_loop()
        try:
            try:
                self.tls_started = True  # from here on, data_received is the TLS layer's
                tls = await loop.start_tls(
                    raw,
                    self,
                    door.context,
                    server_side=True,
                    ssl_handshake_timeout=door.handshake_timeout,
                )
            except Exception as e:
                door.failed(failure_reason(e), self.peer, e, self.host)
                raw.abort()
                return
            if tls is None or self.lost:  # pragma: no cover - gone as it finished
                door.failed("closed", self.peer, "connection lost")
                return
            sslobj = tls.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if der and door.deny_list and fingerprint(der) in door.deny_list:
                door.failed("revoked", self.peer, "certificate in the deny-list", self.host)
                tls.abort()
                return
            door.handshakes += 1
            inner = self.factory()
            tls.set_protocol(inner)
            inner.connection_made(tls)
            if isinstance(inner, asyncio.Protocol):
                for chunk in self.pending:
                    inner.data_received(chunk)
                if self.eof and not inner.eof_received():
                    tls.close()
            self.pending.clear()
        finally:
            door.pending.discard(self)
            self.task = None  # no cycle left for the collector

    def abort(self) -> None:
        """Close the connection now, in whatever step of the handshake it is."""
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.tls_started:
            self.pending.append(data)  # application data with the end of the handshake
        else:
            self.early.append(data)  # TLS records read before start_tls took over

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the listener's protocol decides once it has the link

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to ``protocol`` as its transport would (asyncio's and uvloop's TLS
    layers are buffered protocols)."""
    # uvloop's TLS layer is a buffered protocol that does not subclass asyncio's.
    get_buffer = getattr(protocol, "get_buffer", None)
    if get_buffer is not None:
        view = memoryview(data)
        while view:
            buffer = memoryview(get_buffer(len(view)))
            n = min(len(buffer), len(view))
            if n == 0:  # pragma: no cover - a buffered protocol always offers room
                raise RuntimeError("get_buffer() returned an empty buffer")
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)  # type: ignore[attr-defined]
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)
