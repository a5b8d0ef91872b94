"""Other formats: Hugging Face BitNet checkpoints (`hf`)."""
