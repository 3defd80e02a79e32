"""Generated gRPC stubs for package agentsessions.v1 (run `make proto`; never edit by hand)."""
