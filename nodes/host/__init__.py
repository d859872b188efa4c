"""The host layer: the ComfyUI machinery every node of this pack installs through (declared inputs, run state and
time, the main-call protocol and its contracts, the model-family registry, the block parser, attention, embedding
and convolution hooks, the evaluation counter and telemetry). The modules directly in ``nodes/`` hold node schemas
and short apply functions and register no hook of their own."""
