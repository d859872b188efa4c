"""fgcli: a command-line client for ComfyUI servers running this pack (no ComfyUI import).

``python -m fgcli queue workflows/sd15_txt2img_ag_pag.json --server http://127.0.0.1:8188``; see
``python -m fgcli --help`` and the README section "Headless: templates and the command line".
"""
