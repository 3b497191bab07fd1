"""Text embeddings, the Qdrant store and in-memory vector search."""
