"""Running the gateway under uvicorn, closing WebSockets with 1001 (going away) on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from dgserve.logs import setup_logging
from service.app import create_app
from service.settings import GatewaySettings

log = logging.getLogger("dgserve.gateway")


class GatewayServer(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        gateway = getattr(self.config.loaded_app, "state", None)
        app = self.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None and gateway.websockets:
            log.info("closing %d websockets (1001 going away)", len(gateway.websockets))
            await asyncio.gather(*(ws.close(code=1001, reason="server shutting down")
                                   for ws in list(gateway.websockets)), return_exceptions=True)
        await super().shutdown(sockets)


def run_gateway(settings: GatewaySettings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            ws_max_size=settings.max_ws_message_bytes, timeout_graceful_shutdown=10,
                            access_log=False, lifespan="on")
    server = GatewayServer(config)
    server.run()
    return 0
