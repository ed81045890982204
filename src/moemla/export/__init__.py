"""Ways out of moemla: Hugging Face export, the lm-evaluation-harness model, the OpenAI-compatible server."""
