"""The checkpoint format: packings, quantization_config, export, QuantLinear, loader, inspect."""
