"""Build-time tooling for Tessera: code generation from the protobuf contracts."""
