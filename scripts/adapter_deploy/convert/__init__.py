"""Training-side conversions of a PEFT adapter: merged, bitsandbytes, GGUF."""
