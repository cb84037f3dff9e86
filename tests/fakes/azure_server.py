"""A loopback server that speaks Azure OpenAI's wire format for chat completions, streaming included.

``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` with the ``api-key``
header, as Azure OpenAI serves it: a request without ``api-version`` (or with one the server does
not list) is refused, an unknown deployment is a 404 ``DeploymentNotFound``, a wrong key a 401;
errors carry Azure's string codes (``{"error": {"code": "401", "message": ...}}``). The body and
the answer are Chat Completions (the loopback server's deterministic answers and faults,
:mod:`tests.fakes.loopback.chat`); the ``model`` of an answer is the deployment's underlying model,
whatever the request says; a stream opens with Azure's ``prompt_filter_results`` chunk (empty
``choices``, empty ``id`` and ``model``), as Azure's content filter sends it::

    async with AzureServer(deployments={"chat": "gpt-4o-2024-08-06"}, api_key="k") as srv:
        srv.url   # the base_url (the resource endpoint) of a catalog entry with api: azure
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from tests.fakes.loopback.chat import response, serve_chat
from tests.fakes.loopback.server import LoopbackServer

API_VERSIONS = ("2024-06-01", "2024-10-21", "2025-01-01-preview")
_PREFIX, _SUFFIX = "/openai/deployments/", "/chat/completions"
_FILTERED = {
    "hate": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


def azure_error(status: int, code: str, message: str) -> bytes:
    return response(status, json.dumps({"error": {"code": code, "message": message}}).encode())


class AzureServer(LoopbackServer):
    """Azure OpenAI chat completions on loopback; ``deployments``: deployment name -> model."""

    def __init__(
        self, port: int = 0, *, deployments: Mapping[str, str], api_key: str | None = None, **kw: Any
    ):
        super().__init__(port, **kw)  # no Bearer check: Azure's key comes as api-key
        self.deployments = dict(deployments)
        self.azure_key = api_key
        self.stream_preamble = [
            {"choices": [], "created": 0, "id": "", "model": "", "object": "",
             "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTERED}]}
        ]  # fmt: skip

    async def _dispatch(self, method, path, headers, body, reader, writer, query=""):
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            if path in ("/fault", "/arrivals"):
                return await super()._dispatch(method, path, headers, body, reader, writer, query)
            writer.write(azure_error(404, "404", "Resource not found"))
            return True
        if self.azure_key is not None and headers.get("api-key") != self.azure_key:
            msg = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
                "provide a valid key for an active subscription and use a correct regional API "
                "endpoint for your resource."
            )
            writer.write(azure_error(401, "401", msg))
            return True
        version = (parse_qs(query).get("api-version") or [None])[0]
        if version is None:
            writer.write(azure_error(404, "404", "Resource not found"))
            return True
        if version not in API_VERSIONS:
            writer.write(azure_error(400, "BadRequest", f"API version not supported: {version}"))
            return True
        deployment = path[len(_PREFIX) : -len(_SUFFIX)]
        if deployment not in self.deployments:
            msg = (
                "The API deployment for this resource does not exist. If you created the deployment "
                "within the last 5 minutes, please wait a moment and try again."
            )
            writer.write(azure_error(404, "DeploymentNotFound", msg))
            return True
        if method != "POST":
            writer.write(azure_error(405, "405", "Method not allowed"))
            return True
        try:  # the answer names the deployment's model, whatever the body's "model" says
            req = json.loads(body)
            if isinstance(req, dict):
                req["model"] = self.deployments[deployment]
                body = json.dumps(req).encode()
        except ValueError:
            pass  # serve_chat refuses it
        return await serve_chat(self, headers, body, reader, writer)
