"""Host-independent math of the guidance techniques: plain torch, no ComfyUI import.

Conventions (ComfyUI's denoised space): every prediction is a denoised estimate D of x0; ``D_c`` and ``D_u``
are the conditional and unconditional predictions; CFG is ``D = D_u + w (D_c - D_u)`` with ``w`` the user's
cfg (w = 1 is conditional-only).
"""
