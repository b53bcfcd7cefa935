"""The stages, one module each: a stage plans its memory, reads its inputs and writes one resumable
directory (`run(*inputs, options, tokenizer)`, called by attrib.api)."""
