"""One step on the cached path, shared by training and serving: prompts, batches, scores, decoding, graphs."""
