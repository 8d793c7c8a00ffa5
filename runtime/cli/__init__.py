"""The `python -m runtime` command line: `main.py` (the verbs, the argv rewrite, Hydra),
`key_commands.py` (`keys create|list|revoke`), `build.py` (a Bento of one config), and the build
helpers `config_docs.py` (docs/configuration.md from the schema) and `protoc.py` (the gRPC code)."""
