"""Generated gRPC code lives here (runtime/transports/protoc.py); the .proto files are the source of truth."""
