"""Core features the pack stacks with, and an independent count of what reaches the network."""

from __future__ import annotations

import torch


class NetworkProbe:
    """Counts the chunks that reach the network, independently of the pack: a forward hook on the first layer
    the latent goes through (UNet ``input_blocks[0]``, DiT ``patch_embedding``/``x_embedder``/``img_in``),
    chunks = its batch / the latent batch."""

    def __init__(self, model, latent_batch: int = 1):
        import comfy.model_management

        # another patcher of the same model may still be loaded with its object patches applied (e.g. the
        # analytic mixture of fg_testing.gmm in place of the network): unload it so the model holds its own
        comfy.model_management.unload_all_models()
        net = model.get_model_object("diffusion_model")
        names = ("input_blocks", "patch_embedding", "x_embedder", "img_in")
        layer = next(getattr(net, n) for n in names if hasattr(net, n))
        while isinstance(layer, (torch.nn.ModuleList, torch.nn.Sequential)):  # UNet: a sequence of layers
            layer = layer[0]
        self.chunks = 0
        self.latent_batch = latent_batch
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.chunks += inputs[0].shape[0] // self.latent_batch

    def close(self):
        self.handle.remove()


def core_cache(model, name: str, threshold: float):
    import comfy_extras.nodes_easycache as core

    node = core.EasyCacheNode if name == "EasyCache" else core.LazyCacheNode
    return node.execute(model, threshold, 0.0, 1.0, False).result[0]
