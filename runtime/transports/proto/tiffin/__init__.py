"""Generated gRPC code lives here (runtime/cli/protoc.py); the .proto files are the source of truth."""
