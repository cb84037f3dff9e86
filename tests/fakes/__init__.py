"""Test fakes: stand-ins for the real servers the package talks to (never shipped in router_ml)."""
