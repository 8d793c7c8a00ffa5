"""Bounds on what a JSON schema (`response_format`, Ollama's `format`) may ask of
grammar-constrained generation, checked before llama.cpp sees the schema.

llama-cpp-python turns a schema into a GBNF grammar by spelling repetitions out: `maxLength: n`
becomes n nested optional groups, and llama.cpp's grammar parser spends a stack frame on each.
Measured on llama-cpp-python 0.3.36: past about a thousand nested groups llama.cpp refuses the
grammar (and the sampler llama-cpp-python builds from the refusal crashes at the first token);
past about fifteen thousand its parser overflows the stack and kills the process.
Every enum value and anyOf/oneOf branch is an alternative the sampler tests against each of the
vocabulary's tokens at every step (Gemma 3: 262,144 of them), so their number sets the cost of
every generated token: about 1-2 ms per alternative per token on two cores, 35 s per token for
a 20,000-value enum. Optional properties are alternatives too, where an object begins.

The limits keep both far from harm while real schemas (dozens of properties, enums of a few
hundred values, strings of a thousand characters) stay well inside them. A schema over a limit
is refused with a message naming the keyword, where it is, its value and the limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.types import UnsupportedRequest

# Keywords whose value is a count the grammar spells out (or that bound one).
REPEAT_KEYWORDS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
# Keywords whose value is a map of names to subschemas, a list of subschemas, or one subschema.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
SCHEMA_ONE = (
    "items",
    "additionalProperties",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
SHOWN_CHARS = 60  # how much of an offending value an error message quotes


@dataclass(frozen=True)
class SchemaLimits:
    """What one schema may ask (the reasons and measurements are in the module docstring)."""

    max_depth: int = 32  # containers nested in the schema document
    max_nodes: int = 10_000  # values in the schema document
    # minLength, maxLength, minItems, maxItems, min/maxProperties, min/maxContains and a
    # pattern's {n,m}: each repetition is spelled out in the grammar, nested.
    max_repeat: int = 1000
    max_nested_repeat: int = 100  # a pattern's counted groups holding counts, counts multiplied
    max_alternatives: int = 500  # enum values, consts, anyOf/oneOf branches, type lists, in all
    max_properties: int = 100  # properties of one object
    max_literal_chars: int = 50_000  # JSON text of every enum and const value together
    max_pattern_chars: int = 1000  # one `pattern`
    max_grammar_bytes: int = 1 << 20  # the GBNF grammar built from the schema
    max_grammar_nesting: int = 1100  # groups nested in that grammar


LIMITS = SchemaLimits()


class SchemaTooComplex(UnsupportedRequest):
    """A schema asks more than the limits allow."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message, param)


def check_schema(schema: Any, limits: SchemaLimits = LIMITS) -> None:
    """Refuse (SchemaTooComplex) a schema over a limit. Bounded work: the walk stops at the
    first value past `max_nodes`, so a huge schema costs no more than a refused one."""
    _check_size(schema, limits)
    alternatives = 0
    literal_chars = 0
    for node, pointer in _subschemas(schema):
        for keyword in REPEAT_KEYWORDS:
            if keyword in node:
                _check_count(keyword, node[keyword], pointer, limits)
        properties = node.get("properties")
        if isinstance(properties, dict) and len(properties) > limits.max_properties:
            raise SchemaTooComplex(
                f"the object at {pointer} has {len(properties)} properties, more than the limit"
                f" of {limits.max_properties} per object"
            )
        if isinstance(node.get("pattern"), str):
            _check_pattern(node["pattern"], pointer, limits)
        if "enum" in node and not isinstance(node["enum"], list):
            raise SchemaTooComplex(f"enum at {pointer} must be an array, not {_show(node['enum'])}")
        literals = list(node.get("enum", []))
        literals += [node["const"]] if "const" in node else []
        literal_chars += sum(len(json.dumps(value)) for value in literals)
        alternatives += len(literals)
        alternatives += sum(
            len(node[k]) for k in ("anyOf", "oneOf", "type") if isinstance(node.get(k), list)
        )
        if alternatives > limits.max_alternatives:
            raise SchemaTooComplex(
                f"the schema has more than {limits.max_alternatives} alternatives (enum values,"
                f" consts, anyOf/oneOf branches and type lists together; the limit is reached at"
                f" {pointer}): each one is tested against the whole vocabulary for every token"
            )
        if literal_chars > limits.max_literal_chars:
            raise SchemaTooComplex(
                f"the enum and const values of the schema are more than"
                f" {limits.max_literal_chars} characters of JSON (the limit is reached at"
                f" {pointer})"
            )


def check_grammar(grammar: str, limits: SchemaLimits = LIMITS) -> None:
    """Refuse the GBNF grammar built from a schema if it is too large, or nests deeper than
    llama.cpp's recursive parser can take safely."""
    size = len(grammar.encode())
    if size > limits.max_grammar_bytes:
        raise SchemaTooComplex(
            f"the grammar built from the schema is {size} bytes, more than the limit of"
            f" {limits.max_grammar_bytes}: ask for fewer or shorter repetitions"
        )
    nesting = grammar_nesting(grammar)
    if nesting > limits.max_grammar_nesting:
        raise SchemaTooComplex(
            f"the grammar built from the schema nests {nesting} groups deep, more than the limit"
            f" of {limits.max_grammar_nesting}: lower maxLength/maxItems or a pattern's {{n,m}}"
        )


def grammar_nesting(grammar: str) -> int:
    """How deep parentheses nest in a GBNF grammar (outside literals and character classes)."""
    deepest = depth = 0
    position, end = 0, len(grammar)
    while position < end:
        char = grammar[position]
        if char in '"[':
            closing = '"' if char == '"' else "]"
            position += 1
            while position < end and grammar[position] != closing:
                position += 2 if grammar[position] == "\\" else 1
        elif char == "#":
            while position < end and grammar[position] != "\n":
                position += 1
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        position += 1
    return deepest


def pattern_counts(pattern: str) -> tuple[int, int]:
    """A regex's largest {n,m} count, and its largest product of nested counts (`(a{3}){5}`:
    15; 1 when no counted group holds a count). `*`, `+` and `?` count once: the grammar loops
    on them instead of spelling them out."""
    inside = [1]  # per open group: the largest count (nested ones multiplied) within it so far
    last = 1  # the same for the last item: a group's largest within, 1 for a character
    largest = nested = 1
    position, end = 0, len(pattern)
    while position < end:
        char = pattern[position]
        if char == "\\":
            position += 1
            last = 1
        elif char == "[":
            position += 1
            while position < end and pattern[position] != "]":
                position += 2 if pattern[position] == "\\" else 1
            last = 1
        elif char == "(":
            inside.append(1)
        elif char == ")" and len(inside) > 1:
            last = inside.pop()
            inside[-1] = max(inside[-1], last)
        elif char == "{":
            closing = pattern.find("}", position)
            closing = end if closing < 0 else closing
            count = max([1, *_quantifier_counts(pattern[position + 1 : closing])])
            largest = max(largest, count)
            if last > 1:  # a counted group that holds a count: the grammar nests them
                nested = max(nested, last * count)
            last *= count
            inside[-1] = max(inside[-1], last)
            position = closing
        elif char not in "*+?|":
            last = 1
        position += 1
    return largest, nested


# --- helpers --------------------------------------------------------------------------------------


def _check_size(schema: Any, limits: SchemaLimits) -> None:
    """Bound the whole document first, so that what follows (and json.dumps) is cheap."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    nodes = 0
    while stack:
        node, pointer, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise SchemaTooComplex(
                f"the schema has more than {limits.max_nodes} values, the limit"
                f" (counting stopped at {_show_pointer(pointer)})"
            )
        if depth > limits.max_depth:
            raise SchemaTooComplex(
                f"the schema nests more than {limits.max_depth} levels deep, the limit"
                f" (at {_show_pointer(pointer)})"
            )
        if isinstance(node, dict):
            stack.extend((v, f"{pointer}/{_escape(k)}", depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{pointer}/{i}", depth + 1) for i, v in enumerate(node))


def _subschemas(schema: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Every subschema (a dict in a schema position) with its JSON pointer."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, pointer = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, _show_pointer(pointer)
        for keyword in SCHEMA_MAPS:
            children = node.get(keyword)
            if isinstance(children, dict):
                base = f"{pointer}/{_escape(keyword)}"
                stack.extend((v, f"{base}/{_escape(k)}") for k, v in children.items())
        for keyword in SCHEMA_LISTS:
            items = node.get(keyword)
            if isinstance(items, list):
                stack.extend((v, f"{pointer}/{keyword}/{i}") for i, v in enumerate(items))
        for keyword in SCHEMA_ONE:
            if isinstance(node.get(keyword), dict):
                stack.append((node[keyword], f"{pointer}/{keyword}"))


def _check_count(keyword: str, value: Any, pointer: str, limits: SchemaLimits) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaTooComplex(
            f"{keyword} at {pointer} must be a non-negative integer, not {_show(value)}"
        )
    if value > limits.max_repeat:
        raise SchemaTooComplex(
            f"{keyword} {value} at {pointer} is more than {limits.max_repeat}, the limit for"
            " repetition counts"
        )


def _check_pattern(pattern: str, pointer: str, limits: SchemaLimits) -> None:
    if len(pattern) > limits.max_pattern_chars:
        raise SchemaTooComplex(
            f"the pattern at {pointer} is {len(pattern)} characters, more than the limit of"
            f" {limits.max_pattern_chars} ({_show(pattern)})"
        )
    largest, nested = pattern_counts(pattern)
    if largest > limits.max_repeat:
        raise SchemaTooComplex(
            f"the pattern {_show(pattern)} at {pointer} has a {{n,m}} count of {largest}, more"
            f" than {limits.max_repeat}, the limit for repetition counts"
        )
    if nested > limits.max_nested_repeat:
        raise SchemaTooComplex(
            f"the pattern {_show(pattern)} at {pointer} nests counted repetitions {nested} times"
            f" over (their counts multiplied), more than the limit of {limits.max_nested_repeat}:"
            " every way of splitting the text between them is followed for every token"
        )


def _quantifier_counts(text: str) -> list[int]:
    counts = []
    for part in text.split(",")[:2]:
        digits = part.strip()
        # Bounded before int(): a 5,000-digit count is refused, not converted.
        if digits.isdigit():
            counts.append(int(digits) if len(digits) <= 18 else 10**18)
    return counts


def _escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _show_pointer(pointer: str) -> str:
    return _show(pointer or "/", quote=False)


def _show(value: Any, *, quote: bool = True) -> str:
    """A value for an error message: JSON (strings quoted), cut after SHOWN_CHARS."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str):
        value = value[: SHOWN_CHARS + 1]  # cheap however long it was
    text = json.dumps(value) if quote else str(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."
