"""Plain networks (layer 1): they know nothing of SDEs.

`msdiff.nn.unet.UNet` is the shared score network; `msdiff.nn.attention` holds its attention
block, the swappable attention processors (SDPA, ASAG, PAG, SEG) and the swap context manager.
The CUT/FastCUT networks live with the rest of CUT in `msdiff.cut.networks`.
"""
