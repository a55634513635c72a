"""Inference engines: the Engine protocol, transformers+PEFT, MLX, Whisper, llama.cpp.

Imports only `adapter_deploy.common`. Heavy libraries are imported inside the engine
that needs them, so moving files on an endpoint never imports torch.
"""
