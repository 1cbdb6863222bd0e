"""Benchmarks (``python -m mtbert.bench``): __main__.py picks the parts; core.py times them side by
side; parts.py (single process), dist.py (2 ranks: DDP, ZeRO, FSDP2), compile.py (torch.compile);
gpu_check.py the GPU acceptance check."""
