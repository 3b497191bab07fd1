"""The LLM slow path: the chat client, prompts and interest summaries."""
