"""Levers that make a run faster without changing what it computes (``[speed]`` in a
preset, measured by ``lowvram-ddpo bench speed``): compiling the UNet, the FLOP count
behind model FLOPs utilisation, and the time model `--vram` ranks settings with."""
