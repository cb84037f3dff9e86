"""OpenAI-compatible serving: backend catalog and client, local model servers, the routing proxy."""
