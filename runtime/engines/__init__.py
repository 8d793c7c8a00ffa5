"""Local inference engines behind one Engine protocol (base.py): llama.cpp, transformers,
sentence-transformers, ExLlamaV2."""
