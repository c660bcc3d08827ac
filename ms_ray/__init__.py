"""ms_ray: multi-stream language models on Ray."""
