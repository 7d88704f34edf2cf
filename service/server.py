"""Running the gateway under uvicorn: request read deadlines, quiet WebSocket refusals, and a shutdown that
closes WebSockets with 1001 (going away) and leaves their requests running for the clients to resume."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from protocol.logs import setup_logging
from service.app import create_app
from service.settings import GatewaySettings

log = logging.getLogger("dgserve.gateway")

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class ReadDeadline(HttpToolsProtocol):
    """A request's headers and body must arrive within `read_timeout_s` of the connection opening, or of the
    request's first byte on a kept-alive connection: a client that sends partial headers or a partial body
    (slowloris) is closed, instead of holding a connection forever. Upgrades to WebSocket are exempt."""

    read_timeout_s: float  # DG_READ_TIMEOUT_S: `run_gateway` makes the subclass that sets it

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # type: ignore[union-attr]
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # the app has nothing of it: answer here
            self.transport.write(_TIMED_OUT)
        self.transport.close()  # else the route sees the client leave


class QuietRefusals(WebSocketsSansIOProtocol):
    """uvicorn logs an ERROR for every WebSocket refused with an HTTP answer (401, 403, 429): it counts a
    handshake as complete only when accepted. A refusal is a complete answer."""

    async def send(self, message) -> None:  # type: ignore[override]
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True


class GatewayServer(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        app = self.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:
            gateway.shutting_down = True  # clients that leave now do not cancel: they resume elsewhere
            if gateway.websockets:
                log.info("closing %d websockets (1001 going away)", len(gateway.websockets))
                await asyncio.gather(*(ws.close(code=1001, reason="server shutting down")
                                       for ws in list(gateway.websockets)), return_exceptions=True)
        await super().shutdown(sockets)


def run_gateway(settings: GatewaySettings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    http = type("ReadDeadline", (ReadDeadline,), {"read_timeout_s": settings.read_timeout_s})
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            ws_max_size=settings.max_ws_message_bytes, timeout_graceful_shutdown=10,
                            access_log=False, lifespan="on", http=http, ws=QuietRefusals)
    server = GatewayServer(config)
    server.run()
    return 0
