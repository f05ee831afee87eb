"""Tessera's GraphQL API: accounts, the catalogue and orders in one graph over the gRPC services."""
