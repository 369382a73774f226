"""Export: a run as GGUF for llama.cpp, a PEFT adapter, or a Hugging Face directory with its model card."""
