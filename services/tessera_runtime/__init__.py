"""Tessera's shared service runtime: server bootstrap, health, interceptors, errors, config, database, clients."""
