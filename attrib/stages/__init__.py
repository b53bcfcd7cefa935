"""The pipeline's stages, one module each: inputs in, a stage directory out."""
