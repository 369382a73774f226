"""Models: resolve a spec to weights and tokenizer (`loading`), and the forward pass PPO needs (`forward`)."""
