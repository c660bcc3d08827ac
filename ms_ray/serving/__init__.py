"""Serving multi-stream sessions on Ray Serve (see serve/PROTOCOL.md)."""
