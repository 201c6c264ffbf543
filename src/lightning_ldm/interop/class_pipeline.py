"""A diffusers pipeline for class-conditional latent diffusion, which diffusers itself does not have.

``stage=export`` copies this file into the exported folder as ``pipeline.py``, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it with nothing of this package
installed: it imports only torch and diffusers. The UNet is a ``UNet2DModel`` whose class embedding has one row
more than there are classes: the last is the null class of classifier-free guidance.
"""

import inspect
from typing import List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalLDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vqvae"

    def __init__(self, vqvae, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int]], guidance_scale: float = 1.0,
                 num_inference_steps: int = 20, generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 eta: float = 0.0, output_type: str = "pil", return_dict: bool = True):
        """Images of ``class_labels`` (one each); ``guidance_scale`` 1 is no guidance, and guidance mixes the
        model's outputs for the class and for the null class: uncond + scale * (cond - uncond)."""
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.null_class):
            raise ValueError(f"class labels must lie in [0, {self.null_class}), got {labels.tolist()}")
        size = self.unet.config.sample_size
        latents = randn_tensor((len(labels), self.unet.config.in_channels, size, size), generator=generator,
                               device=self._execution_device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        null = torch.full_like(labels, self.null_class)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            if guidance_scale == 1.0:
                output = self.unet(model_input, t, class_labels=labels).sample
            else:
                both = self.unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([labels, null])).sample
                conditional, unconditional = both.chunk(2)
                output = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(output, t, latents, **extra).prev_sample
        image = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
