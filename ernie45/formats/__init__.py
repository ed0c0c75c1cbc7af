"""Other checkpoint formats, in and out: llama.cpp's GGUF (``gguf``), ERNIEKit/FastDeploy Paddle folders (``paddle``)
and the ``ernie45 convert`` command between them and HF safetensors (``convert``).

This folder imports ``ernie45.model`` and ``ernie45.quant``; neither imports it back (``load_model`` reaches it
lazily by file suffix).
"""
