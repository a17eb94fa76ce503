"""Gemma 3n in export-ready PyTorch: configs, the text decoder, the audio and vision towers and their shared
embedder. Imports nothing of g3n but itself: the checkpoint code builds these modules and fills them."""
