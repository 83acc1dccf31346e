"""The default model: weights (safetensors) and model card, shipped inside the package."""
