"""Research tools: quantization ablations (`ablate`)."""
