"""Prompts in, text statistics out: prompt files, chat/plain rendering, distinct-n and self-BLEU."""
