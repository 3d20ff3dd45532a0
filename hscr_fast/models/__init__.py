"""Model layer: load a VLM (LLaVA, LLaVA-NeXT, Qwen2-VL) and expose the pieces HSCR needs (visual tokens, their
rotary positions, text embeddings, decoder hidden states, lm_head), visual token dropout, tiny models for tests, and
the LLaVA-Med checkpoint converter."""
