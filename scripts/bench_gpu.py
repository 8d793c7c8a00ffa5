"""ExLlamaV2 on a GPU, side by side in one run: Tiffin's ExLlamaV2Engine.generate vs. exllamav2's
dynamic generator called directly, on one loaded model (weights shared, one cache each).

The model is a random FP16 Llama with TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632) and the small byte-level BPE tokenizer of tests/tiny_llama.py, so the
vocabulary (and the LM head) is far smaller than a real model's. The weights are random: speed
only. The rows of the special tokens in the LM head are zero, so greedy decoding never picks EOS
and every request runs its full max_tokens. Requests alternate between the two systems (drift
hits both alike), one at a time, greedy, each with a distinct prompt (no prefix-cache reuse).
TTFT is from the call to the first streamed text; decode tok/s is (completion tokens - 1) over
the time from the first to the last streamed piece. Prints a table, then one JSON line.

    python scripts/bench_gpu.py [--requests 10] [--max-tokens 128] [--layers 22]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_llama import build_tokenizer, corpus  # noqa: E402


def build_model(path: Path, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(512)
    tokenizer.save_pretrained(path)
    vocab = len(tokenizer)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (path / "config.json").write_text(json.dumps(config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> Any:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).half().cpu()

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(mlp, hidden),
            p + "mlp.up_proj.weight": rand(mlp, hidden),
            p + "mlp.down_proj.weight": rand(hidden, mlp),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
        }
    head = rand(vocab, hidden)
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        head[special] = 0
    tensors |= {
        "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
        "lm_head.weight": head,
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def prompts(count: int, words: int) -> list[str]:
    text = " ".join(corpus(200, seed=7)).split()
    return [f"{i} " + " ".join(text[i * 7 : i * 7 + words]) for i in range(count)]


def direct(generator: Any, engine: Any, prompt: str, max_tokens: int) -> dict[str, float]:
    """The same job the engine would make (prompt ids, stop conditions, sampler), run on
    exllamav2's own generator: only Tiffin's wrapper differs between the two sides."""
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    from runtime.engines.exllamav2 import job_fields, sampler_fields

    request = bench_request(prompt, max_tokens)
    start = time.perf_counter()
    ids = engine.prompt_ids(request)
    job = ExLlamaV2DynamicJob(
        input_ids=ids,
        gen_settings=ExLlamaV2Sampler.Settings(**sampler_fields(request)),
        **job_fields(request, max_tokens, engine._eos_ids),
    )
    generator.enqueue(job)
    first = last = None
    tokens = 0
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            if result.get("stage") != "streaming":
                continue
            now = time.perf_counter()
            if result.get("text"):
                first = first or now
                last = now
            if result.get("eos"):
                last = now
                tokens = int(result["new_tokens"])
    assert first is not None and last is not None
    return measure(start, first, last, tokens, int(ids.shape[-1]))


def bench_request(prompt: str, max_tokens: int) -> Any:
    from runtime.types import GenerationRequest

    return GenerationRequest(
        model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0
    )


async def tiffin(engine: Any, prompt: str, max_tokens: int) -> dict[str, float]:
    request = bench_request(prompt, max_tokens)
    start = time.perf_counter()
    first = last = None
    usage = None
    async for chunk in engine.generate(request):
        now = time.perf_counter()
        if chunk.text:
            first = first or now
        last = now
        usage = chunk.usage or usage
    assert first is not None and last is not None and usage is not None
    return measure(start, first, last, usage.completion_tokens, usage.prompt_tokens)


def measure(start: float, first: float, last: float, tokens: int, prompt: int) -> dict[str, float]:
    decode = (tokens - 1) / (last - first) if last > first else 0.0
    return {
        "ttft_ms": (first - start) * 1e3,
        "decode_tps": decode,
        "tokens": tokens,
        "prompt_tokens": prompt,
    }


def summary(name: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "system": name,
        "requests": len(runs),
        "prompt_tokens": runs[0]["prompt_tokens"],
        "completion_tokens": statistics.median(r["tokens"] for r in runs),
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tps_median": statistics.median(r["decode_tps"] for r in runs),
        "decode_tps_min": min(r["decode_tps"] for r in runs),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=150)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()

    import torch
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.attn import has_flash_attn_with_paged
    from exllamav2.generator import ExLlamaV2DynamicGenerator

    from runtime.config_schema import ModelConfig
    from runtime.engines.exllamav2 import ExLlamaV2Engine

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        t0 = time.perf_counter()
        build_model(path, args.hidden, args.layers, 32, 4, 5632 * args.hidden // 2048)
        built = time.perf_counter() - t0
        config = ModelConfig(
            id="bench",
            source=str(path),
            context_length=2048,
            engine_settings={"cache_size": 2048},
        )
        engine = ExLlamaV2Engine(path, config)
        t0 = time.perf_counter()
        await engine.load()
        loaded = time.perf_counter() - t0
        paged = bool(engine.paged)
        cache = ExLlamaV2Cache(engine._model, max_seq_len=engine.cache_tokens)
        generator = ExLlamaV2DynamicGenerator(
            model=engine._model,
            cache=cache,
            tokenizer=engine._tokenizer,
            max_batch_size=engine.parallel if paged else 1,
            paged=paged,
        )
        texts = prompts(args.requests + 2, args.prompt_words)
        for text in texts[:2]:  # warm up both
            direct(generator, engine, text, args.max_tokens)
            await tiffin(engine, text, args.max_tokens)
        runs: dict[str, list[dict[str, float]]] = {"exllamav2 direct": [], "tiffin engine": []}
        for text in texts[2:]:
            runs["exllamav2 direct"].append(direct(generator, engine, text, args.max_tokens))
            runs["tiffin engine"].append(await tiffin(engine, text, args.max_tokens))
        await engine.unload()

    rows = [summary(name, r) for name, r in runs.items()]
    print(
        f"device: {torch.cuda.get_device_name(0)}; paged attention: {paged} "
        f"(flash-attn paged available: {has_flash_attn_with_paged}); "
        f"model built in {built:.1f} s, loaded in {loaded:.1f} s"
    )
    print(f"{'system':<18}{'prompt':>8}{'tokens':>8}{'TTFT ms':>10}{'decode tok/s':>14}{'min':>8}")
    for row in rows:
        print(
            f"{row['system']:<18}{row['prompt_tokens']:>8}{row['completion_tokens']:>8.0f}"
            f"{row['ttft_ms_median']:>10.2f}{row['decode_tps_median']:>14.1f}"
            f"{row['decode_tps_min']:>8.1f}"
        )
    ratio = rows[1]["decode_tps_median"] / rows[0]["decode_tps_median"]
    print(f"tiffin / direct decode: {ratio:.3f}")
    result = {
        "device": torch.cuda.get_device_name(0),
        "paged": paged,
        "layers": args.layers,
        "hidden": args.hidden,
        "max_tokens": args.max_tokens,
        "decode_ratio": ratio,
        "results": rows,
    }
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    asyncio.run(main())
