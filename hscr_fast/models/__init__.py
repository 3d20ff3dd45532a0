"""Model layer: load a LLaVA-family VLM and expose the pieces HSCR needs (visual tokens, text embeddings, decoder
hidden states, lm_head), visual token dropout, tiny models for tests, and the LLaVA-Med checkpoint converter."""
