"""Shipping a run: merged weights (merge.py) and GGUF files with an Ollama Modelfile (gguf.py)."""
