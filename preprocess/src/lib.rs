//! HF-style model directory → tokenizer + chat template → token ids.
