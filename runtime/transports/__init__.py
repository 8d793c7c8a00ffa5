"""Transports: wire formats (HTTP, WebSocket, gRPC, GraphQL) <-> handler calls, all through
the Dispatcher."""
