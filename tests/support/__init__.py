"""Test support shared by every layer: databases, processes, proxies."""
