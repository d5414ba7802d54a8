"""The DICOM node's association server: pynetdicom's threaded server, with the TLS handshake moved off the
accept loop.

pynetdicom (3.0) wraps each accepted socket in TLS inside ``get_request``, on the one thread that accepts every
connection, with no time limit. A client that opens a TCP connection to the TLS port and sends nothing -- a port
scanner, a half-open link, a misconfigured sender speaking plain DICOM to a port that waits for a ClientHello --
held that thread, and the node accepted no one else until the connection closed (measured: with one idle
connection open, a TLS C-ECHO with a certificate from ``--tls-ca`` timed out; without it, 0.1 s). Here the
accept loop only accepts; each connection's own thread runs the handshake under ``HANDSHAKE_TIMEOUT_S`` and
then hands the wrapped socket to pynetdicom as before.

Handshakes in progress are bounded too: pynetdicom counts an association only once it exists, so without a
bound a flood of connections that never speak would each hold a thread for the whole timeout, as many as the
sender opens. One address may have at most the AE's ``maximum_associations`` (``--max-associations``)
handshakes in progress, and all addresses together :data:`MAX_HANDSHAKES`; a connection beyond either is
closed at once. Per address, so that one silent or misbehaving host cannot shut out the others.
"""
from __future__ import annotations

import logging
import socket
import threading

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["HANDSHAKE_TIMEOUT_S", "MAX_HANDSHAKES", "HandshakeInThreadServer", "start_server"]

log = logging.getLogger("mediscan.dicom")

#: Seconds a client has to complete the TLS handshake. It takes milliseconds on a hospital network; ten
#: seconds leaves room for a slow link and still frees the thread of a client that never speaks.
HANDSHAKE_TIMEOUT_S = 10.0
#: TLS handshakes in progress from all addresses together: a bound on the threads silent connections can hold.
MAX_HANDSHAKES = 64


class HandshakeInThreadServer(ThreadedAssociationServer):
    """A :class:`~pynetdicom.transport.ThreadedAssociationServer` whose TLS handshake runs in the
    connection's own thread, with a time limit, instead of in the accept loop."""

    handshake_timeout = HANDSHAKE_TIMEOUT_S

    def server_activate(self) -> None:
        super().server_activate()
        self._handshakes: dict[str, int] = {}      # address -> handshakes in progress
        self._handshakes_lock = threading.Lock()

    def _take_handshake_slot(self, address: str) -> bool:
        """Count one more handshake from ``address``, unless it or all addresses together are at their bound."""
        with self._handshakes_lock:
            mine = self._handshakes.get(address, 0)
            per_address = max(1, int(self.ae.maximum_associations))
            if mine >= per_address or sum(self._handshakes.values()) >= MAX_HANDSHAKES:
                return False
            self._handshakes[address] = mine + 1
            return True

    def _give_handshake_slot(self, address: str) -> None:
        with self._handshakes_lock:
            left = self._handshakes.pop(address) - 1
            if left:
                self._handshakes[address] = left

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Accept only: the handshake waits for the connection's thread (:meth:`process_request_thread`)."""
        return self.socket.accept()

    def process_request_thread(self, request, client_address) -> None:
        """Handshake (when serving TLS), then let pynetdicom run the association on the wrapped socket."""
        if self.ssl_context is not None:
            if not self._take_handshake_slot(client_address[0]):
                log.warning("closed a connection from %s at once: too many TLS handshakes in progress from it "
                            "(--max-associations) or from all (%d)", client_address[0], MAX_HANDSHAKES)
                self.shutdown_request(request)
                return
            previous = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(previous)
            except OSError as exc:  # ssl.SSLError and socket timeouts are OSErrors too
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
            finally:
                self._give_handshake_slot(client_address[0])
        super().process_request_thread(request, client_address)


def start_server(ae: AE, address: tuple[str, int], *, evt_handlers: list, ssl_context=None) -> HandshakeInThreadServer:
    """Start ``ae`` as an association acceptor in a background thread, as ``ae.start_server(block=False)``
    does, with :class:`HandshakeInThreadServer`; stop it with its ``shutdown()``."""
    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context,
                            server_class=HandshakeInThreadServer)
    # ae.start_server registers its servers here, and the server's shutdown() removes itself from the list.
    ae._servers.append(server)  # noqa: SLF001
    threading.Thread(target=server.serve_forever, name="mediscan-dicom-accept", daemon=True).start()
    return server
