"""The OpenAI-compatible routing front: request validation, the routing engine, the proxy, the SDK."""
