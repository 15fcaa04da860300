"""xecomla: upcycle a pretrained LLM's attention into multi-head latent attention (X-EcoMLA)."""

__version__ = "0.1.0"
