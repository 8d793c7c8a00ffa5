"""Generated gRPC code lives here (runtime/cli/protoc.py); the .proto files are the source
of truth. Importing this package generates the code first when it is missing or older than a
.proto (a fresh clone, an edited .proto), so every entry point works from a clean checkout."""

from runtime.cli.protoc import ensure_generated

ensure_generated()
